# Finds Eigen 3.4.x or 5.x, for mha's own build and for its package config (installed or in a
# build tree): mha_find_eigen() sets MHA_EIGEN_ERROR to a message when no suitable Eigen is
# found, and leaves it empty otherwise.
#
# Why the request carries no version: no version argument of find_package accepts both. Eigen
# 3.4's version file refuses any range that leaves major version 3 ("3.4...<6" finds nothing),
# and Eigen 5.0's reads a plain "3.4" as 3.4.x only. So mha takes the first Eigen3 package in
# CMake's search order (Eigen3_DIR, then CMAKE_PREFIX_PATH, then the system's prefixes) and checks
# its version against the supported range. On a machine with both, the system's Eigen is used
# unless Eigen3_DIR (or CMAKE_PREFIX_PATH) points at the other one.
set(MHA_EIGEN_MIN_VERSION 3.4)
set(MHA_EIGEN_MAX_VERSION_EXCLUDED 6)

macro(mha_find_eigen)
  set(MHA_EIGEN_ERROR "")
  find_package(Eigen3 NO_MODULE QUIET)
  if(NOT Eigen3_FOUND)
    set(MHA_EIGEN_ERROR
        "mha needs Eigen 3.4 or 5.x and found none: install it (Debian and Ubuntu: libeigen3-dev) or set Eigen3_DIR to the folder holding Eigen3Config.cmake")
  elseif(Eigen3_VERSION VERSION_LESS MHA_EIGEN_MIN_VERSION
         OR NOT Eigen3_VERSION VERSION_LESS MHA_EIGEN_MAX_VERSION_EXCLUDED)
    set(MHA_EIGEN_ERROR
        "mha needs Eigen 3.4 or 5.x, found Eigen ${Eigen3_VERSION} in ${Eigen3_DIR}: set Eigen3_DIR to the folder holding the Eigen3Config.cmake of a supported Eigen")
  endif()
endmacro()
