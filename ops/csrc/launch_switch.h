// A process-wide on/off launch setting (like cudnn.benchmark): read once from an environment
// variable (0 disables, 1 enables; unset: the switch's default), changed at run time from Python through
// torch.ops.splitvl_launch. Every stream and thread launches the same way; reading it is one
// relaxed load per launch. Kernels launched after a change use the new value, so CUDA graphs
// keep the one they were captured with.
#pragma once

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace splitvl {

class LaunchSwitch {
 public:
  explicit LaunchSwitch(const char* env_name, bool default_on = true)
      : flag_(env_default(env_name, default_on)) {}

  bool enabled() const { return flag_.load(std::memory_order_relaxed); }
  void set(bool enabled) { flag_.store(enabled, std::memory_order_relaxed); }

 private:
  static bool env_default(const char* env_name, bool default_on) {
    const char* value = std::getenv(env_name);
    if (value == nullptr || *value == '\0') return default_on;
    return std::strcmp(value, "0") != 0;
  }

  std::atomic<bool> flag_;
};

}  // namespace splitvl

// Defines splitvl::NAME_enabled() and splitvl::set_NAME_enabled(bool) (declared in the switch's
// header for the launchers) over one LaunchSwitch read from ENV_NAME, and registers them as
// torch.ops.splitvl_launch.NAME_enabled() and .set_NAME(bool) (ops/_launch_switch.py). Used once
// per switch, at namespace scope of a .cpp file built with or without CUDA.
#define SPLITVL_LAUNCH_SWITCH(NAME, ENV_NAME, DEFAULT_ON)                                       \
  namespace splitvl {                                                                          \
  namespace {                                                                                  \
  LaunchSwitch& NAME##_switch() {                                                              \
    static LaunchSwitch flag{ENV_NAME, DEFAULT_ON};                                            \
    return flag;                                                                               \
  }                                                                                            \
  }                                                                                            \
  bool NAME##_enabled() { return NAME##_switch().enabled(); }                                  \
  void set_##NAME##_enabled(bool enabled) { NAME##_switch().set(enabled); }                    \
  }                                                                                            \
  TORCH_LIBRARY_FRAGMENT(splitvl_launch, m) {                                                  \
    m.def("set_" #NAME "(bool enabled) -> ()", [](bool enabled) { splitvl::set_##NAME##_enabled(enabled); }); \
    m.def(#NAME "_enabled() -> bool", [] { return splitvl::NAME##_enabled(); });               \
  }
