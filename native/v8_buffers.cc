#include "v8_buffers.h"

#include <v8.h>

#include <cstring>
#include <memory>

namespace pm {
namespace {

// napi_value is a v8::Local<v8::Value> in Node's implementation (src/js_native_api_v8.h does the
// same cast); callers hold a handle scope because they run inside a Node-API callback.
v8::Local<v8::Value> ToLocal(napi_value v) {
  v8::Local<v8::Value> local;
  static_assert(sizeof(local) == sizeof(v), "napi_value is a V8 handle");
  std::memcpy(static_cast<void*>(&local), &v, sizeof(v));
  return local;
}

napi_value FromLocal(v8::Local<v8::Value> local) {
  napi_value v;
  std::memcpy(&v, static_cast<void*>(&local), sizeof(v));
  return v;
}

}  // namespace

napi_value NewSharedArrayBuffer(napi_env env, void* data, size_t length, BackingDeleter deleter,
                                void* deleterData) {
  v8::Isolate* isolate = v8::Isolate::GetCurrent();
  std::unique_ptr<v8::BackingStore> store =
      v8::SharedArrayBuffer::NewBackingStore(data, length, deleter, deleterData);
  v8::Local<v8::SharedArrayBuffer> sab = v8::SharedArrayBuffer::New(isolate, std::move(store));
  return FromLocal(sab);
}

ViewKind GetBytes(napi_value value, Bytes* out) {
  v8::Local<v8::Value> v = ToLocal(value);
  if (v.IsEmpty()) return ViewKind::kNone;
  if (v->IsSharedArrayBuffer()) {
    auto store = v.As<v8::SharedArrayBuffer>()->GetBackingStore();
    *out = {static_cast<uint8_t*>(store->Data()), store->ByteLength(), true};
    return ViewKind::kSharedArrayBuffer;
  }
  if (v->IsArrayBuffer()) {
    auto store = v.As<v8::ArrayBuffer>()->GetBackingStore();
    *out = {static_cast<uint8_t*>(store->Data()), store->ByteLength(), false};
    return ViewKind::kArrayBuffer;
  }
  if (v->IsArrayBufferView()) {
    auto view = v.As<v8::ArrayBufferView>();
    auto store = view->Buffer()->GetBackingStore();
    *out = {static_cast<uint8_t*>(store->Data()) + view->ByteOffset(), view->ByteLength(),
            store->IsShared()};
    if (v->IsUint8Array()) return ViewKind::kUint8;
    if (v->IsUint32Array()) return ViewKind::kUint32;
    if (v->IsInt32Array()) return ViewKind::kInt32;
    if (v->IsBigUint64Array()) return ViewKind::kBigUint64;
    if (v->IsFloat64Array()) return ViewKind::kFloat64;
    return ViewKind::kOtherView;
  }
  return ViewKind::kNone;
}

}  // namespace pm
