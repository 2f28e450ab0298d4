# Cross-compiling for AArch64 Linux with Debian's g++-aarch64-linux-gnu and
# the arm64 packages of Debian multiarch (libabsl-dev:arm64, ...; see
# scripts/install-deps.sh --aarch64). The binaries run on an arm64 host or
# under qemu-user: `make test-aarch64` runs the store's tests that way.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
# Libraries and CMake packages of the target; programs of the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu /usr)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# pkg-config (hiredis): the arm64 .pc files only.
set(ENV{PKG_CONFIG_LIBDIR}
    /usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig)
# ctest runs the test binaries through qemu-user (QEMU_CPU picks the model).
# No -L: the arm64 libc of multiarch (libc6:arm64) is where its loader
# looks; qemu 7.2 with -L hangs in the first pthread_create here.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64-static)
