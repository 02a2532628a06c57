// Preloaded (LD_PRELOAD) into a bench_mla.py process that times sgl-kernel's flashmla_ops extension, which was built
// against torch 2.9.1 and CUDA 12 and runs here beside torch 2.10+ and CUDA 13 (flashmla_live.py builds and
// preloads it). It supplies what that mismatch breaks, and nothing else changes for other callers:
// - two torch symbols whose signatures changed in torch 2.10 (the old forms, forwarding or failing loudly);
// - at::cuda::getCurrentDeviceProperties(): CUDA 13 dropped fields from cudaDeviceProp, so the extension would read
//   the SM count and compute capability at CUDA 12's offsets from a CUDA 13 struct (it planned one SM part and
//   failed its checks). Calls from the extension get the struct as CUDA 12's runtime (libcudart.so.12, which the
//   extension links) fills it; every other caller gets torch's own.
// No link-time dependencies: torch's and the CUDA 12 runtime's functions are looked up when first called.
// Not mended here: torch 2.10 counts tensor references in one 64-bit word with a has-PyObject bit
// (c10/util/intrusive_ptr.h), while the extension's inlined 2.9 code counts the old way; its host code then fails
// now and then ("Cannot access data pointer of Tensor that doesn't have storage"). bench_mla.py works around it:
// a fresh worker process per config, and only replays of a CUDA graph (no host code) whose output matched ours.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

void* must_find(void* handle, const char* name) {
  void* f = dlsym(handle, name);
  if (f == nullptr) {
    std::fprintf(stderr, "flashmla_shim: %s not found: %s\n", name, dlerror());
    std::abort();
  }
  return f;
}

bool called_from_flashmla(void* return_address) {
  Dl_info info;
  return dladdr(return_address, &info) != 0 && info.dli_fname != nullptr &&
         std::strstr(info.dli_fname, "flashmla_ops") != nullptr;
}

// CUDA 12's cudaDeviceProp is ~1 KB; room for it per device, filled once.
constexpr int kMaxDevices = 64;
alignas(16) char cuda12_props[kMaxDevices][4096];
bool cuda12_filled[kMaxDevices];

void* cuda12_props_of_current_device() {
  void* rt = dlopen("libcudart.so.12", RTLD_NOW | RTLD_NOLOAD);
  if (rt == nullptr) rt = dlopen("libcudart.so.12", RTLD_NOW);
  if (rt == nullptr) {
    std::fprintf(stderr, "flashmla_shim: libcudart.so.12 not loadable: %s\n", dlerror());
    std::abort();
  }
  auto get_device = reinterpret_cast<int (*)(int*)>(must_find(rt, "cudaGetDevice"));
  auto get_props = reinterpret_cast<int (*)(void*, int)>(must_find(rt, "cudaGetDeviceProperties_v2"));
  int dev = 0;
  if (get_device(&dev) != 0 || dev < 0 || dev >= kMaxDevices) std::abort();
  if (!cuda12_filled[dev]) {
    if (get_props(cuda12_props[dev], dev) != 0) std::abort();
    cuda12_filled[dev] = true;
  }
  return cuda12_props[dev];
}

}  // namespace

struct cudaDeviceProp;

namespace at::cuda {
cudaDeviceProp* getCurrentDeviceProperties() {
  using Fn = cudaDeviceProp* (*)();
  // torch's libraries are loaded locally (not in the global scope RTLD_NEXT searches): ask libtorch_cuda itself.
  static Fn torch_own = reinterpret_cast<Fn>(
      must_find(dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD), "_ZN2at4cuda26getCurrentDevicePropertiesEv"));
  if (called_from_flashmla(__builtin_return_address(0))) {
    return static_cast<cudaDeviceProp*>(cuda12_props_of_current_device());
  }
  return torch_own();
}
}  // namespace at::cuda

namespace c10::cuda {
// torch >= 2.10 takes the line as uint32_t (mangled ...S2_jb); the extension calls the int form on every
// C10_CUDA_CHECK.
void c10_cuda_check_implementation(int err, const char* file, const char* func, int line, bool dsa) {
  using Fn = void (*)(int32_t, const char*, const char*, uint32_t, bool);
  static Fn current = reinterpret_cast<Fn>(
      must_find(dlopen("libc10_cuda.so", RTLD_NOW | RTLD_NOLOAD), "_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb"));
  current(err, file, func, static_cast<uint32_t>(line), dsa);
}
}  // namespace c10::cuda

namespace c10 {
// The old (file, line, severity) logger constructor: only a failed CHECK inside the extension reaches it, and the
// caller's object was laid out for the old class, so report and stop instead of forwarding.
class MessageLogger {
 public:
  MessageLogger(const char* file, int line, int severity);
};
MessageLogger::MessageLogger(const char* file, int line, int severity) {
  std::fprintf(stderr, "flashmla_ops: failed check at %s:%d (severity %d)\n", file, line, severity);
  std::abort();
}
}  // namespace c10
