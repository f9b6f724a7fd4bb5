/* A CPU stage's decode glue: everything in a Llama layer but its matrix products, in a few calls, and the float
   products themselves at the few rows of decoding (homespec/native/__init__.py). Activations fp32; the products'
   inputs and outputs bf16 (torch's int4/int8 CPU kernels, bf16 weights) or fp32 (fp32 weights): the `f32` flags; the
   KV cache fp32 or bf16 (`kv32`). Attention one row at a time over its keys in slot order (a row gets the same bits
   whatever rows ride with it and wherever its keys sit: model/stage.py). Plain C that compilers vectorize, AVX-512
   intrinsics where they pay (attention, the products), work items over OpenMP threads where the compiler has it. */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef union {
    float f;
    uint32_t u;
    int32_t i;
} word;

static inline uint16_t f2bf(float f) {
    word w = {.f = f};
    uint32_t u = w.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf2f(uint16_t b) {
    word w = {.u = (uint32_t)b << 16};
    return w.f;
}

/* element i of a bf16 or fp32 (f32) array */
static inline float get(const void* p, size_t i, int f32) {
    return f32 ? ((const float*)p)[i] : bf2f(((const uint16_t*)p)[i]);
}

static inline void put(void* p, size_t i, float v, int f32) {
    if (f32)
        ((float*)p)[i] = v;
    else
        ((uint16_t*)p)[i] = f2bf(v);
}

enum { F32, BF16, I8 };

/* element i of fp32, bf16 or int8 values */
static inline float elem(const void* p, size_t i, int kind) {
    return kind == F32 ? ((const float*)p)[i] : kind == BF16 ? bf2f(((const uint16_t*)p)[i]) : ((const int8_t*)p)[i];
}

/* the portable dot product of w and x over n values (n % 16 == 0): 16 lanes, then the lanes halved in a fixed order
   (what the fallbacks below compute where the compiler does not target AVX-512) */
static inline float dot_lanes(const void* w, int wk, const void* x, int xk, int n) {
    float lane[16] = {0};
    for (int i = 0; i < n; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += elem(w, (size_t)i + l, wk) * elem(x, (size_t)i + l, xk);
    for (int l = 8; l > 0; l >>= 1)
        for (int k = 0; k < l; k++) lane[k] += lane[k + l];
    return lane[0];
}

/* e^x in fp32 that compilers vectorize (libm's expf does not vectorize without -ffast-math): Cody-Waite range
   reduction and Cephes' degree-5 polynomial, within 2 ulp; x clamped to [-87.3, 88.7] */
static inline float hs_expf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.f;
    word scale = {.i = ((int32_t)n + 127) << 23};
    return y * scale.f;
}

/* sum of squares of x[0..H) in 16 lanes, then the lanes in a fixed order: the same bits for a row whatever n */
static inline float sumsq(const float* x, int H) {
    float lane[16] = {0};
    int i = 0;
    for (; i + 16 <= H; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += x[i + l] * x[i + l];
    float s = 0.f;
    for (; i < H; i++) s += x[i] * x[i];
    for (int l = 0; l < 16; l++) s += lane[l];
    return s;
}

/* out[r] = w * (h[r] / sqrt(mean(h[r]^2) + eps)), bf16 or fp32 (f32) */
void hs_rms(const float* h, const float* w, int n, int H, float eps, void* out, int f32) {
    for (int r = 0; r < n; r++) {
        const float* x = h + (size_t)r * H;
        float inv = 1.f / sqrtf(sumsq(x, H) / (float)H + eps);
        for (int i = 0; i < H; i++) put(out, (size_t)r * H + i, w[i] * (x[i] * inv), f32);
    }
}

/* h += y (y: [n, H], bf16 or fp32); then out = rms(h) as hs_rms (out may be NULL: the add alone) */
void hs_add_rms(float* h, const void* y, const float* w, int n, int H, float eps, void* out, int f32) {
    size_t count = (size_t)n * H;
    for (size_t i = 0; i < count; i++) h[i] += get(y, i, f32);
    if (out) hs_rms(h, w, n, H, eps, out, f32);
}

/* qkv [n, (heads + 2 kvh) d] (bf16 or fp32: f32) -> q fp32 [n, heads, d] after RoPE; k (after RoPE) and v written
   to the cache's slots start .. start + n ([kvh, slots, d] per layer, fp32 or bf16: kv32) */
void hs_rope_store(const void* qkv, const float* cos, const float* sin, int n, int heads, int kvh, int d, float* q,
                   void* kc, void* vc, int slots, int start, int f32, int kv32) {
    int half = d / 2, width = (heads + 2 * kvh) * d;
    float tmp[512], rot[512];
    for (int r = 0; r < n; r++) {
        size_t row = (size_t)r * width;
        const float* c = cos + (size_t)r * d;
        const float* s = sin + (size_t)r * d;
        for (int hh = 0; hh < heads + kvh; hh++) {
            for (int i = 0; i < d; i++) tmp[i] = get(qkv, row + (size_t)hh * d + i, f32);
            float* dst = hh < heads ? q + ((size_t)r * heads + hh) * d : rot;
            for (int i = 0; i < half; i++) dst[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
            for (int i = half; i < d; i++) dst[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
            if (hh >= heads) {
                size_t at = ((size_t)(hh - heads) * slots + start + r) * d;
                for (int i = 0; i < d; i++) put(kc, at + i, rot[i], kv32);
            }
        }
        for (int hh = 0; hh < kvh; hh++) {
            size_t at = ((size_t)hh * slots + start + r) * d;
            for (int i = 0; i < d; i++) put(vc, at + i, get(qkv, row + (size_t)(heads + kvh + hh) * d + i, f32), kv32);
        }
    }
}

/* 16 keys' or values' floats at p (fp32, or bf16 widened: exact) */
#if defined(__AVX512F__)
static inline __m512 load16(const void* p, size_t i, int f32) {
    if (f32) return _mm512_loadu_ps((const float*)p + i);
    __m256i b = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
#endif

/* q . k over d values (d % 16 == 0; k fp32 or bf16: f32) in a fixed order: 16 lanes, then the lanes. AVX-512
   where the compiler targets it (one register, its own reduction), else plain C that compilers vectorize. */
static inline float dot16(const float* a, const void* b, size_t at, int d, int f32) {
#if defined(__AVX512F__)
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(a), load16(b, at, f32));
    for (int i = 16; i < d; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b, at + i, f32), s);
    return _mm512_reduce_add_ps(s);
#else
    return dot_lanes(a, F32, (const char*)b + at * (f32 ? 4 : 2), f32 ? F32 : BF16, d);
#endif
}

/* o = sum over c < nv of p[c] * V[idx[c]] / total (V [.., d] rows, fp32 or bf16: v32; o bf16 or fp32: f32): the
   row's keys in slot order; 64 outputs at a time kept in registers over the keys */
static inline void weighted_sum(const float* p, const int* idx, int nv, const void* V, int d, float total, void* o,
                                size_t at, int v32, int f32) {
    float acc[64];
    for (int c0 = 0; c0 < d; c0 += 64) {
        int width = d - c0 < 64 ? d - c0 : 64;
#if defined(__AVX512F__)
        if (width == 64) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int c = 0; c < nv; c++) {
                size_t vk = (size_t)idx[c] * d + c0;
                __m512 pk = _mm512_set1_ps(p[c]);
                a0 = _mm512_fmadd_ps(pk, load16(V, vk, v32), a0);
                a1 = _mm512_fmadd_ps(pk, load16(V, vk + 16, v32), a1);
                a2 = _mm512_fmadd_ps(pk, load16(V, vk + 32, v32), a2);
                a3 = _mm512_fmadd_ps(pk, load16(V, vk + 48, v32), a3);
            }
            _mm512_storeu_ps(acc, a0);
            _mm512_storeu_ps(acc + 16, a1);
            _mm512_storeu_ps(acc + 32, a2);
            _mm512_storeu_ps(acc + 48, a3);
        } else
#endif
        {
            for (int i = 0; i < width; i++) acc[i] = 0.f;
            for (int c = 0; c < nv; c++) {
                size_t vk = (size_t)idx[c] * d + c0;
                for (int i = 0; i < width; i++) acc[i] += p[c] * get(V, vk + i, v32);
            }
        }
        for (int i = 0; i < width; i++) put(o, at + c0 + i, acc[i] / total, f32);
    }
}

/* attention of rows q [n, heads, d] over keys/values [kvh, slots, d] (the first `used` slots) where mask [n, used]
   allows (keys and values fp32 or bf16: kv32): out [n, heads * d], bf16 or fp32 (f32). Each (row, head) on its own over the keys its row sees, taken in slot order and
   numbered c = 0, 1, ... (the scores' sum in 16 lanes by c), so a row gets the same bits whatever rows ride with it,
   wherever its keys sit (in ar they are contiguous; in a tree wave its ancestors sit among others' nodes, and a
   verified path's keys move to the prefix) and however the items are shared among threads (OpenMP, as many as
   torch uses). work: 2 * n * heads * used floats. */
void hs_attend(const float* q, const void* kc, const void* vc, const uint8_t* mask, int n, int heads, int kvh, int d,
               int slots, int used, float scale, float* work, void* out, int f32, int kv32) {
    int group = heads / kvh, items = n * heads;
#pragma omp parallel for schedule(static) if (items > 1)
    for (int it = 0; it < items; it++) {
        int r = it / heads, hh = it % heads, g = hh / group;
        const uint8_t* m = mask + (size_t)r * used;
        size_t base = (size_t)g * slots * d;  /* this key head's first slot in kc and vc */
        const float* qh = q + ((size_t)r * heads + hh) * d;
        float* w = work + (size_t)it * 2 * used;
        int* idx = (int*)(w + used);
        int nv = 0;
        for (int j = 0; j < used; j++)
            if (m[j]) idx[nv++] = j;
        float best = -INFINITY;
        for (int c = 0; c < nv; c++) {
            float s = dot16(qh, kc, base + (size_t)idx[c] * d, d, kv32) * scale;
            w[c] = s;
            best = s > best ? s : best;
        }
        float lane[16] = {0};
        int c = 0;
        for (; c + 16 <= nv; c += 16)
            for (int l = 0; l < 16; l++) {
                float x = w[c + l] - best, e = x < -87.3f ? 0.f : hs_expf(x);
                w[c + l] = e;
                lane[l] += e;
            }
        for (int l = 0; c + l < nv; l++) {
            float x = w[c + l] - best;
            w[c + l] = x < -87.3f ? 0.f : hs_expf(x);
            lane[l] += w[c + l];
        }
        float total = 0.f;
        for (int l = 0; l < 16; l++) total += lane[l];
        weighted_sum(w, idx, nv, (const char*)vc + base * (kv32 ? 4 : 2), d, total, out, ((size_t)r * heads + hh) * d,
                     kv32, f32);
    }
}

/* gu [n, 2 I] (gate | up) -> [n, I]: silu(gate) * up in fp32; bf16 or fp32 in and out (f32) */
void hs_silu_mul(const void* gu, int n, int inter, void* out, int f32) {
    for (int r = 0; r < n; r++) {
        size_t g = (size_t)r * 2 * inter, u = g + inter, o = (size_t)r * inter;
        for (int i = 0; i < inter; i++) {
            float x = get(gu, g + i, f32);
            put(out, o + i, x / (1.f + hs_expf(-x)) * get(gu, u + i, f32), f32);
        }
    }
}

/* y[r, o] (row stride ldy) = x[r] . W[o] for r < n, o < out, all fp32 (W [out, in], x [n, in], in % 16 == 0): a
   float stage's products at decoding's few rows, where torch's fp32 kernels cost 2-4x (BENCHMARKS.md §6). W is
   read once for four rows at a time; each output is one dot product in a fixed order (16 lanes, then the lanes),
   so a row gets the same bits whatever rows ride with it. Outputs over OpenMP threads. */
void hs_linear_f32(const float* x, const float* W, int n, int in, int out, float* y, int ldy) {
#pragma omp parallel for schedule(static) if (out >= 64)
    for (int o = 0; o < out; o++) {
        const float* w = W + (size_t)o * in;
        for (int r0 = 0; r0 < n; r0 += 4) {
            int m = n - r0 < 4 ? n - r0 : 4;
            const float* x0 = x + (size_t)r0 * in;
#if defined(__AVX512F__)
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int i = 0; i < in; i += 16) {
                __m512 wv = _mm512_loadu_ps(w + i);
                for (int j = 0; j < m; j++) acc[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + (size_t)j * in + i), acc[j]);
            }
            for (int j = 0; j < m; j++) y[(size_t)(r0 + j) * ldy + o] = _mm512_reduce_add_ps(acc[j]);
#else
            for (int j = 0; j < m; j++) y[(size_t)(r0 + j) * ldy + o] = dot_lanes(w, F32, x0 + (size_t)j * in, F32, in);
#endif
        }
    }
}

/* the same with bf16 x, W and y (in % 32 == 0), the sums in fp32: AVX512-BF16's dot products of pairs where the
   CPU has them, else each bf16 widened (exact) into fp32 multiply-adds */
void hs_linear_bf16(const uint16_t* x, const uint16_t* W, int n, int in, int out, uint16_t* y, int ldy) {
#pragma omp parallel for schedule(static) if (out >= 64)
    for (int o = 0; o < out; o++) {
        const uint16_t* w = W + (size_t)o * in;
        for (int r0 = 0; r0 < n; r0 += 4) {
            int m = n - r0 < 4 ? n - r0 : 4;
            const uint16_t* x0 = x + (size_t)r0 * in;
#if defined(__AVX512BF16__)
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int i = 0; i < in; i += 32) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);
                for (int j = 0; j < m; j++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], wv, (__m512bh)_mm512_loadu_si512(x0 + (size_t)j * in + i));
            }
            for (int j = 0; j < m; j++) y[(size_t)(r0 + j) * ldy + o] = f2bf(_mm512_reduce_add_ps(acc[j]));
#else
            for (int j = 0; j < m; j++)
                y[(size_t)(r0 + j) * ldy + o] = f2bf(dot_lanes(w, BF16, x0 + (size_t)j * in, BF16, in));
#endif
        }
    }
}

/* the same with int8 codes W [out, in] and one bf16 scale per output row (w = code * scale; quant.Int8Channel), x
   and y bf16: y[r, o] = bf16(scale[o] * sum of x[r] * code), the sum in fp32 as above, x widened into xf (n * in
   floats of scratch) first. What torch's int8 kernel computes, at decoding's few rows for a fifth of its time here
   (BENCHMARKS.md §6). */
void hs_linear_i8(const uint16_t* x, const int8_t* W, const uint16_t* scales, int n, int in, int out, uint16_t* y,
                  int ldy, float* xf) {
    for (size_t i = 0; i < (size_t)n * in; i++) xf[i] = bf2f(x[i]);
#pragma omp parallel for schedule(static) if (out >= 64)
    for (int o = 0; o < out; o++) {
        const int8_t* w = W + (size_t)o * in;
        float scale = bf2f(scales[o]);
        for (int r0 = 0; r0 < n; r0 += 4) {
            int m = n - r0 < 4 ? n - r0 : 4;
            const float* x0 = xf + (size_t)r0 * in;
#if defined(__AVX512F__)
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int i = 0; i < in; i += 16) {
                __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + i))));
                for (int j = 0; j < m; j++) acc[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x0 + (size_t)j * in + i), acc[j]);
            }
            for (int j = 0; j < m; j++) y[(size_t)(r0 + j) * ldy + o] = f2bf(_mm512_reduce_add_ps(acc[j]) * scale);
#else
            for (int j = 0; j < m; j++)
                y[(size_t)(r0 + j) * ldy + o] = f2bf(dot_lanes(w, I8, x0 + (size_t)j * in, F32, in) * scale);
#endif
        }
    }
}
