// Runs model/kernels on inputs from a file, for the kernels' tests on CPUs this machine is not (the NEON
// build under qemu-user): tests/helpers/kernel_driver.py writes the jobs and reads the results.
//
// A file is a sequence of blobs (an int64 byte count, then the bytes). A job starts with a blob of int64s:
//   qlinear: [1, M, K, N, bits, G, x_bf16, y_bf16], then x, then the packed weights; writes y.
//   decode:  [2, threads], then DecodeShape's bytes, then per layer: attn_norm, mlp_norm, for each of
//            q k v o gate up down: [group, bits, n] and its packed weights, then [capacity], keys, values;
//            then h, cos, sin; writes h, then every layer's keys and values.
// Results go to the output file as blobs, job after job.

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

extern "C" int lc_qlinear(const void*, int, int64_t, int64_t, const uint8_t*, int, int64_t, int64_t, void*, int, int);
extern "C" int lc_decode(void*, const void*, const void*, const void*, const void*, int);
extern "C" int lc_abi();
extern "C" const char* lc_variant();

namespace {

struct QMat {
  const uint8_t* data;
  int64_t group, bits, n;
};

struct DecodeLayer {  // model/kernels/decode.cpp's, field for field
  const void* attn_norm;
  const void* mlp_norm;
  QMat mats[7];
  void* keys;
  void* values;
  int64_t capacity;
};

using Blob = std::vector<uint8_t>;

bool read_blob(FILE* f, Blob& out) {
  int64_t n;
  if (fread(&n, 8, 1, f) != 1) return false;
  out.resize((size_t)n);
  if (n && fread(out.data(), 1, (size_t)n, f) != (size_t)n) {
    fprintf(stderr, "truncated input\n");
    exit(2);
  }
  return true;
}

Blob next(FILE* f) {
  Blob b;
  if (!read_blob(f, b)) {
    fprintf(stderr, "input ends inside a job\n");
    exit(2);
  }
  return b;
}

void write_blob(FILE* f, const void* p, int64_t n) {
  fwrite(&n, 8, 1, f);
  fwrite(p, 1, (size_t)n, f);
}

const int64_t* ints(const Blob& b) { return (const int64_t*)b.data(); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  if (!in || !out) return 2;
  fprintf(stderr, "kernel %s, ABI %d\n", lc_variant(), lc_abi());
  Blob head;
  while (read_blob(in, head)) {
    const int64_t* p = ints(head);
    if (p[0] == 1) {
      const int64_t M = p[1], K = p[2], N = p[3], bits = p[4], G = p[5], x_bf16 = p[6], y_bf16 = p[7];
      Blob x = next(in), w = next(in);
      Blob y((size_t)(M * N * (y_bf16 ? 2 : 4)));
      if (lc_qlinear(x.data(), (int)x_bf16, M, K, w.data(), (int)bits, G, N, y.data(), (int)y_bf16, 1) != 0) return 3;
      write_blob(out, y.data(), (int64_t)y.size());
    } else if (p[0] == 2) {
      const int threads = (int)p[1];
      Blob shape = next(in);
      const int64_t layers = ints(shape)[0];
      std::vector<Blob> keep;  // every buffer the layers point into
      constexpr size_t per_layer = 11;  // 2 norms, 7 matrices, keys, values
      keep.reserve((size_t)layers * per_layer);
      std::vector<DecodeLayer> specs((size_t)layers);
      for (auto& L : specs) {
        keep.push_back(next(in));
        L.attn_norm = keep.back().data();
        keep.push_back(next(in));
        L.mlp_norm = keep.back().data();
        for (auto& m : L.mats) {
          Blob desc = next(in);
          keep.push_back(next(in));
          m = QMat{keep.back().data(), ints(desc)[0], ints(desc)[1], ints(desc)[2]};
        }
        L.capacity = ints(next(in))[0];
        keep.push_back(next(in));
        L.keys = keep.back().data();
        keep.push_back(next(in));
        L.values = keep.back().data();
      }
      Blob h = next(in), cos = next(in), sin = next(in);
      if (lc_decode(h.data(), specs.data(), shape.data(), cos.data(), sin.data(), threads) != 0) return 3;
      write_blob(out, h.data(), (int64_t)h.size());
      for (size_t i = 0; i < keep.size(); ++i)  // keys and values: the last two buffers of each layer
        if (i % per_layer >= per_layer - 2) write_blob(out, keep[i].data(), (int64_t)keep[i].size());
    } else {
      fprintf(stderr, "unknown job %lld\n", (long long)p[0]);
      return 2;
    }
  }
  fclose(out);
  return 0;
}
