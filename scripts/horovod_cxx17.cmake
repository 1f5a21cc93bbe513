# Toolchain file for building Horovod 0.28.1 against PyTorch 2.x, which needs C++17.
# Horovod's CMakeLists asks for C++14; this makes CMake's C++14 flag mean C++17.
set(CMAKE_PROJECT_INCLUDE "${CMAKE_CURRENT_LIST_DIR}/horovod_cxx17_project.cmake")
