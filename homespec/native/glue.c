/* A quantized stage's decode glue: everything in a Llama layer but its four matrix products, in a few calls
   (homespec/native/__init__.py). Activations fp32, the products' inputs and outputs bf16 (torch's int4/int8 CPU
   kernels), attention one row at a time over its keys in slot order (a row gets the same bits whatever rows ride
   with it and wherever its keys sit: model/stage.py). Plain C that compilers vectorize, AVX-512 intrinsics where
   they pay (attention), attention's (row, head) items over OpenMP threads where the compiler has it. */
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

/* out[r] = bf16(w * (h[r] / sqrt(mean(h[r]^2) + eps))) */
void hs_rms_bf16(const float* h, const float* w, int n, int H, float eps, uint16_t* out) {
    for (int r = 0; r < n; r++) {
        const float* x = h + (size_t)r * H;
        float inv = 1.f / sqrtf(sumsq(x, H) / (float)H + eps);
        for (int i = 0; i < H; i++) out[(size_t)r * H + i] = f2bf(w[i] * (x[i] * inv));
    }
}

/* h += fp32(y) (y: bf16 [n, H]); then out = rms(h) as hs_rms_bf16 (out may be NULL: the add alone) */
void hs_add_rms_bf16(float* h, const uint16_t* y, const float* w, int n, int H, float eps, uint16_t* out) {
    size_t count = (size_t)n * H;
    for (size_t i = 0; i < count; i++) h[i] += bf2f(y[i]);
    if (out) hs_rms_bf16(h, w, n, H, eps, out);
}

/* qkv bf16 [n, (heads + 2 kvh) d] -> q fp32 [n, heads, d] after RoPE; k (after RoPE) and v written to the
   cache's slots start .. start + n ([kvh, slots, d] per layer, fp32) */
void hs_rope_store(const uint16_t* qkv, const float* cos, const float* sin, int n, int heads, int kvh, int d,
                   float* q, float* kc, float* vc, int slots, int start) {
    int half = d / 2, width = (heads + 2 * kvh) * d;
    float tmp[512];
    for (int r = 0; r < n; r++) {
        const uint16_t* row = qkv + (size_t)r * width;
        const float* c = cos + (size_t)r * d;
        const float* s = sin + (size_t)r * d;
        for (int hh = 0; hh < heads + kvh; hh++) {
            const uint16_t* x = row + hh * d;
            for (int i = 0; i < d; i++) tmp[i] = bf2f(x[i]);
            float* dst = hh < heads ? q + ((size_t)r * heads + hh) * d : kc + ((size_t)(hh - heads) * slots + start + r) * d;
            for (int i = 0; i < half; i++) dst[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
            for (int i = half; i < d; i++) dst[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
        for (int hh = 0; hh < kvh; hh++) {
            const uint16_t* x = row + (heads + kvh + hh) * d;
            float* dst = vc + ((size_t)hh * slots + start + r) * d;
            for (int i = 0; i < d; i++) dst[i] = bf2f(x[i]);
        }
    }
}

/* q . k over d floats (d % 16 == 0) in a fixed order: 16 lanes, then the lanes. AVX-512 where the compiler targets
   it (one register, its own reduction), else plain C that compilers vectorize. */
static inline float dot16(const float* a, const float* b, int d) {
#if defined(__AVX512F__)
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int i = 16; i < d; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
    return _mm512_reduce_add_ps(s);
#else
    float lane[16] = {0};
    for (int i = 0; i < d; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += a[i + l] * b[i + l];
    for (int l = 8; l > 0; l >>= 1)
        for (int k = 0; k < l; k++) lane[k] += lane[k + l];
    return lane[0];
#endif
}

/* o = bf16(sum over c < nv of p[c] * V[idx[c]] / total), V [.., d] rows: the row's keys in slot order; 64 outputs
   at a time kept in registers over the keys */
static inline void weighted_sum(const float* p, const int* idx, int nv, const float* V, int d, float total,
                                uint16_t* o) {
    float acc[64];
    for (int c0 = 0; c0 < d; c0 += 64) {
        int width = d - c0 < 64 ? d - c0 : 64;
#if defined(__AVX512F__)
        if (width == 64) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int c = 0; c < nv; c++) {
                const float* vk = V + (size_t)idx[c] * d + c0;
                __m512 pk = _mm512_set1_ps(p[c]);
                a0 = _mm512_fmadd_ps(pk, _mm512_loadu_ps(vk), a0);
                a1 = _mm512_fmadd_ps(pk, _mm512_loadu_ps(vk + 16), a1);
                a2 = _mm512_fmadd_ps(pk, _mm512_loadu_ps(vk + 32), a2);
                a3 = _mm512_fmadd_ps(pk, _mm512_loadu_ps(vk + 48), a3);
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
                const float* vk = V + (size_t)idx[c] * d + c0;
                for (int i = 0; i < width; i++) acc[i] += p[c] * vk[i];
            }
        }
        for (int i = 0; i < width; i++) o[c0 + i] = f2bf(acc[i] / total);
    }
}

/* attention of rows q [n, heads, d] over keys/values [kvh, slots, d] (the first `used` slots) where mask [n, used]
   allows: out bf16 [n, heads * d]. Each (row, head) on its own over the keys its row sees, taken in slot order and
   numbered c = 0, 1, ... (the scores' sum in 16 lanes by c), so a row gets the same bits whatever rows ride with it,
   wherever its keys sit (in ar they are contiguous; in a tree wave its ancestors sit among others' nodes, and a
   verified path's keys move to the prefix) and however the items are shared among threads (OpenMP, as many as
   torch uses). work: 2 * n * heads * used floats. */
void hs_attend(const float* q, const float* kc, const float* vc, const uint8_t* mask, int n, int heads, int kvh,
               int d, int slots, int used, float scale, float* work, uint16_t* out) {
    int group = heads / kvh, items = n * heads;
#pragma omp parallel for schedule(static) if (items > 1)
    for (int it = 0; it < items; it++) {
        int r = it / heads, hh = it % heads, g = hh / group;
        const uint8_t* m = mask + (size_t)r * used;
        const float* K = kc + (size_t)g * slots * d;
        const float* V = vc + (size_t)g * slots * d;
        const float* qh = q + ((size_t)r * heads + hh) * d;
        float* w = work + (size_t)it * 2 * used;
        int* idx = (int*)(w + used);
        int nv = 0;
        for (int j = 0; j < used; j++)
            if (m[j]) idx[nv++] = j;
        float best = -INFINITY;
        for (int c = 0; c < nv; c++) {
            float s = dot16(qh, K + (size_t)idx[c] * d, d) * scale;
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
        weighted_sum(w, idx, nv, V, d, total, out + ((size_t)r * heads + hh) * d);
    }
}

/* gu bf16 [n, 2 I] (gate | up) -> bf16 [n, I]: silu(gate) * up in fp32 */
void hs_silu_mul(const uint16_t* gu, int n, int inter, uint16_t* out) {
    float silu_tmp[1024];
    for (int r = 0; r < n; r++) {
        const uint16_t* g = gu + (size_t)r * 2 * inter;
        const uint16_t* u = g + inter;
        float* o = silu_tmp;
        for (int c = 0; c < inter; c += 1024) {
            int m = inter - c < 1024 ? inter - c : 1024;
            for (int i = 0; i < m; i++) {
                float x = bf2f(g[c + i]);
                o[i] = x / (1.f + hs_expf(-x)) * bf2f(u[c + i]);
            }
            for (int i = 0; i < m; i++) out[(size_t)r * inter + c + i] = f2bf(o[i]);
        }
    }
}
