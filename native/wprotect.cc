// userfaultfd write-protection for the arena (see wprotect.h). Tried in order: /dev/userfaultfd
// (kernel 6.1+, if its permissions let us), the userfaultfd(2) system call (root, CAP_SYS_PTRACE or
// vm.unprivileged_userfaultfd=1), then the same in user-mode-only, which anyone may use.
#include "wprotect.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstdint>

namespace pm {
namespace {

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif

int OpenUffd(bool userOnly) {
  int flags = O_CLOEXEC | O_NONBLOCK | (userOnly ? UFFD_USER_MODE_ONLY : 0);
  if (!userOnly) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
      int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
      close(dev);
      if (fd >= 0) return fd;
    }
  }
  return static_cast<int>(syscall(SYS_userfaultfd, flags));
}

// The handshake, asking for write-protection of shmem (our memfd windows and pool mappings);
// pages not mapped yet are protected too where the kernel can (WP_UNPOPULATED).
bool Handshake(int fd, uint64_t features) {
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = features;
  if (ioctl(fd, UFFDIO_API, &api) != 0) return false;
  return (api.ioctls & (1ULL << _UFFDIO_REGISTER)) != 0;
}

int Open(bool userOnly) {
  const uint64_t wanted[] = {UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED, UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
  for (uint64_t features : wanted) {  // the handshake is once per fd: a refused one needs a new fd
    int fd = OpenUffd(userOnly);
    if (fd < 0) return -1;
    if (Handshake(fd, features)) return fd;
    close(fd);
  }
  return -1;
}

}  // namespace

WriteProtector::WriteProtector() {
  const char* off = getenv("PAGEMERGE_NO_WRITE_PROTECT");  // for diagnosis: shows what protection prevents
  if (off && *off && *off != '0') return;
  if ((fd_ = Open(false)) >= 0) mode_ = kFull;
  else if ((fd_ = Open(true)) >= 0) mode_ = kUser;
}

WriteProtector::~WriteProtector() {
  if (fd_ >= 0) close(fd_);  // unregisters every range
}

const char* WriteProtector::Name(Mode m) { return m == kFull ? "full" : m == kUser ? "user" : "none"; }

int WriteProtector::Register(void* at, size_t len) {
  if (mode_ == kNone) return 0;
  struct uffdio_register reg = {};
  reg.range.start = reinterpret_cast<uintptr_t>(at);
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  return ioctl(fd_, UFFDIO_REGISTER, &reg) == 0 ? 0 : errno;
}

int WriteProtector::Protect(void* at, size_t len) {
  if (mode_ == kNone) return 0;
  if (int err = Register(at, len)) return err;
  if (int err = WriteProtect(at, len)) {
    Release(at, len, false);  // whatever part of the range it did protect
    return err;
  }
  return 0;
}

int WriteProtector::WriteProtect(void* at, size_t len) {
  if (mode_ == kNone) return 0;
  struct uffdio_writeprotect wp = {};
  wp.range.start = reinterpret_cast<uintptr_t>(at);
  wp.range.len = len;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  return ioctl(fd_, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
}

void WriteProtector::Unprotect(void* at, size_t len) {
  if (mode_ == kNone) return;
  struct uffdio_writeprotect wp = {};
  wp.range = {reinterpret_cast<uintptr_t>(at), len};
  wp.mode = 0;  // no DONTWAKE: wakes the writers too
  ioctl(fd_, UFFDIO_WRITEPROTECT, &wp);
}

void WriteProtector::Unregister(void* at, size_t len) {
  if (mode_ == kNone) return;
  struct uffdio_range range = {reinterpret_cast<uintptr_t>(at), len};
  ioctl(fd_, UFFDIO_UNREGISTER, &range);
  ioctl(fd_, UFFDIO_WAKE, &range);
}

void WriteProtector::Release(void* at, size_t len, bool remapped) {
  if (mode_ == kNone) return;
  struct uffdio_range range = {reinterpret_cast<uintptr_t>(at), len};
  if (!remapped) {  // clears the protection (and markers left on zapped pages), then the registration
    struct uffdio_writeprotect wp = {};
    wp.range = range;
    wp.mode = 0;
    ioctl(fd_, UFFDIO_WRITEPROTECT, &wp);
    ioctl(fd_, UFFDIO_UNREGISTER, &range);
  }
  ioctl(fd_, UFFDIO_WAKE, &range);  // writers that faulted in between (a no-op when there are none)
}

}  // namespace pm
