// The only place that touches raw V8: Node-API cannot make a SharedArrayBuffer whose backing
// store is our own mmap'd memory (nor read one's address), and V8's NewBackingStore can.
#pragma once
#include <node_api.h>

#include <cstddef>
#include <cstdint>

namespace pm {

using BackingDeleter = void (*)(void* data, size_t length, void* deleterData);

// A SharedArrayBuffer over [data, data+length); `deleter` runs (on any thread) when V8 frees it.
napi_value NewSharedArrayBuffer(napi_env env, void* data, size_t length, BackingDeleter deleter,
                                void* deleterData);

struct Bytes {
  uint8_t* data = nullptr;
  size_t length = 0;
  bool shared = false;  // backed by a SharedArrayBuffer
};

enum class ViewKind { kNone, kSharedArrayBuffer, kArrayBuffer, kUint8, kUint32, kInt32, kBigUint64, kFloat64, kOtherView };

// Bytes of a SharedArrayBuffer, ArrayBuffer or ArrayBufferView; kind says which it was.
ViewKind GetBytes(napi_value value, Bytes* out);

}  // namespace pm
