# Compiles and runs the consumer programs with nothing but the flags of the installed pkg-config
# files: cmake -DPKG_CONFIG=... -DCXX=... -DPKG_CONFIG_PATH=<prefix>/share/pkgconfig
#   -DVERSION=x.y.z -DSAFETENSORS=ON|OFF -DSOURCE_DIR=tests/consumer -DWORK_DIR=... -P this file
set(ENV{PKG_CONFIG_PATH} "${PKG_CONFIG_PATH}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(check_version module)
  execute_process(COMMAND ${PKG_CONFIG} --modversion ${module} OUTPUT_VARIABLE found
                  RESULT_VARIABLE status OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(status OR NOT found STREQUAL VERSION)
    message(FATAL_ERROR "pkg-config --modversion ${module}: '${found}', expected ${VERSION}")
  endif()
endfunction()

function(compile_and_run module source)
  execute_process(COMMAND ${PKG_CONFIG} --cflags ${module} OUTPUT_VARIABLE cflags
                  RESULT_VARIABLE status OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(status)
    message(FATAL_ERROR "pkg-config --cflags ${module} failed (PKG_CONFIG_PATH=${PKG_CONFIG_PATH})")
  endif()
  message(STATUS "pkg-config --cflags ${module}: ${cflags}")
  separate_arguments(cflags UNIX_COMMAND "${cflags}")
  get_filename_component(name ${source} NAME_WE)
  execute_process(COMMAND ${CXX} -std=c++17 ${cflags} ${SOURCE_DIR}/${source} -o ${WORK_DIR}/${name}
                  RESULT_VARIABLE status)
  if(status)
    message(FATAL_ERROR "compiling ${source} with the flags of ${module}.pc failed")
  endif()
  execute_process(COMMAND ${WORK_DIR}/${name} RESULT_VARIABLE status)
  if(status)
    message(FATAL_ERROR "${name} (built with ${module}.pc) failed: ${status}")
  endif()
endfunction()

check_version(mha)
compile_and_run(mha main.cpp)
if(SAFETENSORS)
  check_version(mha-safetensors)
  compile_and_run(mha-safetensors safetensors_main.cpp)
endif()
