// Decode attention builds side by side in one process (benchmarks/attention_ab.py builds them and
// runs this): each library given is loaded, called on the same caches in alternating rounds, and
// its median us a call printed. One process for every build: the machine's bandwidth moves between
// runs by more than the differences looked for.
//
//   attention_ab H Hkv L D kind caches rounds lib.so...   (kind: 0 fp32, 1 bf16, 2 int8 codes)
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// the entry of decode_attention.h
using Kernel = void (*)(const float*, const void*, const void*, const float*, float*, const float*, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t, const float*, const float*);

struct Cache {
  std::vector<char> k, v;
  std::vector<float> k_scale, v_scale;
};

// rows of K and V of n values each as `kind` (int8: codes with one scale a row)
static Cache make_cache(int64_t rows, int64_t D, int kind, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  const int64_t width = kind == 0 ? 4 : kind == 1 ? 2 : 1;
  Cache c;
  for (auto* values : {&c.k, &c.v}) {
    values->resize(rows * D * width);
    for (int64_t i = 0; i < rows * D; ++i) {
      const float x = normal(rng);
      if (kind == 0) {
        std::memcpy(values->data() + i * 4, &x, 4);
      } else if (kind == 1) {
        uint32_t bits;
        std::memcpy(&bits, &x, 4);
        const uint16_t top = bits >> 16;
        std::memcpy(values->data() + i * 2, &top, 2);
      } else {
        (*values)[i] = static_cast<char>(std::clamp(std::lround(x * 40), -127L, 127L));
      }
    }
  }
  if (kind == 2) c.k_scale.assign(rows, 1.0f / 40), c.v_scale.assign(rows, 1.0f / 40);
  return c;
}

int main(int argc, char** argv) {
  if (argc < 9) {
    std::fprintf(stderr, "attention_ab H Hkv L D kind caches rounds lib.so...\n");
    return 2;
  }
  const int64_t H = std::atoll(argv[1]), Hkv = std::atoll(argv[2]), L = std::atoll(argv[3]), D = std::atoll(argv[4]);
  const int kind = std::atoi(argv[5]), caches = std::atoi(argv[6]), rounds = std::atoi(argv[7]);
  std::vector<Kernel> kernels;
  for (int i = 8; i < argc; ++i) {
    void* lib = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      std::fprintf(stderr, "%s\n", dlerror());
      return 1;
    }
    kernels.push_back(reinterpret_cast<Kernel>(dlsym(lib, "kernel")));
  }
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<Cache> set;
  for (int c = 0; c < caches; ++c) set.push_back(make_cache(Hkv * L, D, kind, rng));
  std::vector<float> q(H * D), mask(L, 0.0f), first(H * D), out(H * D);
  for (float& x : q) x = normal(rng);
  for (int64_t l = L - 64; l < L; ++l) mask[l] = -INFINITY;  // a static cache's unwritten tail
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto call = [&](Kernel kernel, const Cache& c, float* o) {
    kernel(q.data(), c.k.data(), c.v.data(), mask.data(), o, &scale, 1, H, Hkv, L, D, Hkv * L * D, L * D, D,
           Hkv * L * D, L * D, D, L, 0, 1, 1, kind, kind == 2 ? c.k_scale.data() : nullptr,
           kind == 2 ? c.v_scale.data() : nullptr);
  };
  call(kernels[0], set[0], first.data());
  for (size_t i = 1; i < kernels.size(); ++i) {  // the builds must agree before their times mean anything
    call(kernels[i], set[0], out.data());
    float worst = 0;
    for (int64_t j = 0; j < H * D; ++j) worst = std::max(worst, std::fabs(out[j] - first[j]));
    std::printf("build %zu: largest difference from build 0: %g\n", i, worst);
    if (!(worst < 1e-3f)) return 1;
  }
  std::vector<std::vector<double>> us(kernels.size());
  const int passes = std::max(1, 60 / caches);
  for (int r = 0; r < rounds; ++r) {
    for (size_t i = 0; i < kernels.size(); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int p = 0; p < passes; ++p)
        for (const Cache& c : set) call(kernels[i], c, out.data());
      const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - t0;
      us[i].push_back(took.count() / (passes * caches));
    }
  }
  for (size_t i = 0; i < kernels.size(); ++i) {
    std::sort(us[i].begin(), us[i].end());
    std::printf("build %zu: median %.1f us a call (min %.1f, max %.1f)\n", i, us[i][us[i].size() / 2], us[i].front(),
                us[i].back());
  }
  return 0;
}
