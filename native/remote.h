#pragma once
#include <napi.h>

namespace pm {
// Reading other processes for the estimator: pagemap present bits, hashing and comparing pages
// read with process_vm_readv. Failures of the target are reported per range, never thrown.
void InitRemote(Napi::Env env, Napi::Object exports);
}  // namespace pm
