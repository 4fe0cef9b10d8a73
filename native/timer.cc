// The background scanner's sleep: a one-shot libuv timer that calls a JavaScript function and
// does not keep the process alive. Node's setTimeout wakes the same event loop but also walks its
// JavaScript timer lists and re-arms a Timeout object: here that cost 30 to 55 µs more CPU per
// wake-up (70-104 against 100-160 µs), and the scanner wakes 50 times a second at ksmd's defaults.
#include <node_api.h>
#include <uv.h>

#include <cerrno>
#include <cmath>

#include "common.h"
#include "timer.h"

namespace pm {
namespace {

class Timer : public Napi::ObjectWrap<Timer> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Timer",
                       {
                           InstanceMethod("arm", &Timer::Arm),
                           InstanceMethod("cancel", &Timer::Cancel),
                           InstanceMethod("close", &Timer::Close),
                       });
  }

  // new Timer(callback): nothing runs until arm().
  explicit Timer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Timer>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsFunction()) {
      ThrowType(env, code::INVALID_ARG, "callback must be a function");
      return;
    }
    uv_loop_t* loop = nullptr;
    napi_value name;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || napi_create_string_utf8(env, "pagemerge:scan", NAPI_AUTO_LENGTH, &name) != napi_ok ||
        napi_async_init(env, nullptr, name, &async_) != napi_ok) {
      // these fail only when V8 cannot allocate the resource object or the string
      ThrowErrno(env, ENOMEM, "napi_async_init", "cannot set up the scanner's timer");
      return;
    }
    callback_ = Napi::Persistent(info[0].As<Napi::Function>());
    handle_ = new uv_timer_t;
    uv_timer_init(loop, handle_);
    handle_->data = this;
    uv_unref(reinterpret_cast<uv_handle_t*>(handle_));  // a sleeping scanner does not keep the process alive
    env_ = env;
    napi_add_env_cleanup_hook(env, &Timer::OnEnvCleanup, this);
  }

  ~Timer() override {
    Shut();
    DestroyAsync();
  }

 private:
  // arm(ms): calls the callback once, ms from now (at least 1 ms; re-arming an armed timer moves it).
  Napi::Value Arm(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) return ThrowType(env, code::INVALID_ARG, "ms must be a number");
    double ms = info[0].As<Napi::Number>().DoubleValue();
    if (!std::isfinite(ms) || ms < 0 || ms > 4294967295.0) return ThrowRange(env, code::OUT_OF_RANGE, "ms must be from 0 to 2^32 - 1");
    if (!handle_) return ThrowType(env, code::INVALID_ARG, "the timer is closed");
    // At least 1 ms, as Node's setTimeout: libuv runs a timer re-armed at 0 inside its own callback
    // again in the same pass over due timers, so a scanner at sleepMillisecs 0 would starve the loop.
    uv_timer_start(handle_, &Timer::OnTimer, ms < 1 ? 1 : static_cast<uint64_t>(ms), 0);
    return env.Undefined();
  }

  Napi::Value Cancel(const Napi::CallbackInfo& info) {
    if (handle_) uv_timer_stop(handle_);
    return info.Env().Undefined();
  }

  // close(): stops it for good and lets go of the callback; closing twice does nothing.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shut();
    return info.Env().Undefined();
  }

  void Shut() {
    if (!handle_) return;
    uv_timer_stop(handle_);
    handle_->data = nullptr;
    // libuv owns the handle until its close callback: freed there, never here
    uv_close(reinterpret_cast<uv_handle_t*>(handle_), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    handle_ = nullptr;
    napi_remove_env_cleanup_hook(env_, &Timer::OnEnvCleanup, this);
    callback_.Reset();  // the callback may be running (close() from inside it): its value stays in that scope
  }

  // Not in Shut(): close() may be called from inside the callback, whose napi_make_callback is still
  // using the context; it lives as long as the Timer.
  void DestroyAsync() {
    if (async_) napi_async_destroy(env_, async_);
    async_ = nullptr;
  }

  static void OnEnvCleanup(void* arg) {
    auto* self = static_cast<Timer*>(arg);
    self->Shut();
    self->DestroyAsync();
  }

  static void OnTimer(uv_timer_t* h) {
    auto* self = static_cast<Timer*>(h->data);
    if (!self) return;
    napi_env env = self->env_;
    napi_handle_scope scope;
    if (napi_open_handle_scope(env, &scope) != napi_ok) return;
    napi_value fn = self->callback_.Value(), recv, result;
    napi_get_global(env, &recv);  // the receiver must be an object; the callback is an arrow function
    // As for a timer of Node's own: microtasks run after it, and an exception it lets out is the
    // process's uncaught exception, not swallowed here.
    if (napi_make_callback(env, self->async_, recv, fn, 0, nullptr, &result) == napi_pending_exception) {
      napi_value err;
      napi_get_and_clear_last_exception(env, &err);
      napi_fatal_exception(env, err);
    }
    napi_close_handle_scope(env, scope);
  }

  napi_env env_ = nullptr;
  napi_async_context async_ = nullptr;
  uv_timer_t* handle_ = nullptr;
  Napi::FunctionReference callback_;
};

}  // namespace

void InitTimer(Napi::Env env, Napi::Object exports) { exports.Set("Timer", Timer::Define(env)); }

}  // namespace pm
