# Compiles SOURCE twice with COMPILER and FLAGS: with -D${CONTROL} it must compile (so that a
# failure below comes from the code, not from the command), without it it must fail with every
# string of EXPECTED in the compiler's output.
separate_arguments(flags UNIX_COMMAND "${FLAGS}")
execute_process(COMMAND ${COMPILER} ${flags} -D${CONTROL} -fsyntax-only ${SOURCE}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the control (-D${CONTROL}) does not compile:\n${out}${err}")
endif()
execute_process(COMMAND ${COMPILER} ${flags} -fsyntax-only ${SOURCE}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
set(all "${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled; it must not")
endif()
foreach(expected IN LISTS EXPECTED)
  string(FIND "${all}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "compiler output lacks \"${expected}\":\n${all}")
  endif()
endforeach()
