# Runs PROGRAM, which must stop abnormally (not exit 0) after printing EXPECTED to its output or
# error stream: the -fno-exceptions fallback reports the error, then aborts.
execute_process(COMMAND ${PROGRAM} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
set(all "${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "${PROGRAM} exited normally; expected an abort\n${all}")
endif()
foreach(expected IN LISTS EXPECTED)
  string(FIND "${all}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "output lacks \"${expected}\":\n${all}")
  endif()
endforeach()
