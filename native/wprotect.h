#pragma once
#include <cstddef>

namespace pm {

// Write-protection of pages while they are compared and remapped, so that a write from another
// thread cannot land between the two and be lost: userfaultfd in write-protect mode. A writer that
// touches a protected page waits (in the kernel, no signal handler involved) until Release().
class WriteProtector {
 public:
  enum Mode { kNone, kUser, kFull };
  WriteProtector();
  ~WriteProtector();
  WriteProtector(const WriteProtector&) = delete;
  WriteProtector& operator=(const WriteProtector&) = delete;

  // kFull: every writer waits, threads and system calls (read(2) into the buffer) alike.
  // kUser: userfaultfd in user-mode-only (what an unprivileged process gets): threads wait, but
  // a system call writing into a protected page fails with EFAULT. kNone: no userfaultfd at all.
  Mode mode() const { return mode_; }
  static const char* Name(Mode m);
  // Registers the range with userfaultfd and protects it; 0 or an errno. Ranges are registered
  // only while protected, so that mappings keep their flags (and stay joined to their neighbours,
  // and mergeable by ksmd) the rest of the time.
  int Protect(void* at, size_t len);
  // Ends protection: wakes the writers, who then write into whatever the range maps now. When the
  // range was remapped, the registration went with the old mapping and only the wake is needed.
  void Release(void* at, size_t len, bool remapped);

  // The same in steps, for many extents of one range (see DropZero): Register() the whole range
  // once, WriteProtect() and Unprotect() each extent (any thread), Unregister() the range once all
  // are unprotected. One registration instead of one per extent: each splits and joins mappings
  // under the process's mmap lock, held exclusively, which would stall the helper's drops.
  int Register(void* at, size_t len);
  int WriteProtect(void* at, size_t len);
  void Unprotect(void* at, size_t len);  // clears the protection and wakes the writers
  void Unregister(void* at, size_t len);

 private:
  int fd_ = -1;
  Mode mode_ = kNone;
};

// Protects a range for the lifetime of a scope; Remapped() says the old mapping was replaced.
class ProtectedRange {
 public:
  ProtectedRange(WriteProtector& wp, void* at, size_t len) : wp_(wp), at_(at), len_(len) { err_ = wp.Protect(at, len); }
  ~ProtectedRange() {
    if (err_ == 0) wp_.Release(at_, len_, remapped_);
  }
  int error() const { return err_; }  // 0, or the errno that kept the range from being protected
  void Remapped() { remapped_ = true; }

 private:
  WriteProtector& wp_;
  void* at_;
  size_t len_;
  int err_;
  bool remapped_ = false;
};

}  // namespace pm
