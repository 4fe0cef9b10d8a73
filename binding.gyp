{
  "targets": [
    {
      "target_name": "pagemerge",
      "sources": [
        "native/addon.cc",
        "native/arena.cc",
        "native/kernel.cc",
        "native/pages.cc",
        "native/procfs.cc",
        "native/registry.cc",
        "native/remote.cc",
        "native/timer.cc",
        "native/v8_buffers.cc",
        "native/wprotect.cc"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "<!(node -p \"require('path').join(require('path').dirname(require.resolve('xxhash-addon/package.json')), 'xxHash')\")"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NAPI_DISABLE_CPP_EXCEPTIONS",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
        "_GNU_SOURCE"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-std=c++17", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
      "conditions": [
        ["OS!='linux'", { "sources!": ["native/arena.cc", "native/kernel.cc", "native/procfs.cc", "native/remote.cc", "native/wprotect.cc"] }]
      ]
    }
  ]
}
