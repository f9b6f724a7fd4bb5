/* A quantized stage's decode glue: everything in a Llama layer but its four matrix products, in a few calls
   (homespec/native/__init__.py). Activations fp32, the products' inputs and outputs bf16 (torch's int4/int8 CPU
   kernels), attention one row at a time over its keys in slot order (a row gets the same bits whatever rows ride
   with it and wherever its keys sit: model/stage.py). Plain C that compilers vectorize; no intrinsics, no threads. */
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

/* attention of rows q [n, heads, d] over keys/values [kvh, slots, d] (the first `used` slots) where mask [n, used]
   allows: out bf16 [n, heads * d]. One row at a time, its keys in slot order, the masked ones skipped, so a row gets
   the same bits whatever rows ride with it (in ar its keys are contiguous, in a tree wave its ancestors sit among
   other nodes' slots). The query heads that share a key head read each key and value once. fp32 throughout;
   work: heads / kvh * used floats. */
void hs_attend(const float* q, const float* kc, const float* vc, const uint8_t* mask, int n, int heads, int kvh,
               int d, int slots, int used, float scale, float* work, uint16_t* out) {
    int group = heads / kvh;
    float acc[16 * 512];
    for (int r = 0; r < n; r++) {
        const uint8_t* m = mask + (size_t)r * used;
        for (int g = 0; g < kvh; g++) {
            const float* K = kc + (size_t)g * slots * d;
            const float* V = vc + (size_t)g * slots * d;
            const float* Q = q + ((size_t)r * heads + (size_t)g * group) * d; /* the group's heads, contiguous */
            for (int j = 0; j < used; j++) {
                const float* kj = K + (size_t)j * d;
                for (int h = 0; h < group; h++) {
                    const float* qh = Q + (size_t)h * d;
                    float lane[16] = {0};
                    for (int i = 0; i < d; i += 16)
                        for (int l = 0; l < 16; l++) lane[l] += qh[i + l] * kj[i + l];
                    float sc = 0.f;
                    for (int l = 0; l < 16; l += 2) sc += lane[l] + lane[l + 1];
                    work[(size_t)h * used + j] = m[j] ? sc * scale : -INFINITY;
                }
            }
            for (int h = 0; h < group; h++) {
                float* w = work + (size_t)h * used;
                float best = -INFINITY;
                for (int j = 0; j < used; j++) best = w[j] > best ? w[j] : best;
                for (int j = 0; j < used; j++) w[j] = m[j] ? hs_expf(w[j] - best) : 0.f;
            }
            for (int i = 0; i < group * d; i++) acc[i] = 0.f;
            for (int j = 0; j < used; j++) {
                if (!m[j]) continue;
                const float* vj = V + (size_t)j * d;
                for (int h = 0; h < group; h++) {
                    float p = work[(size_t)h * used + j];
                    float* ah = acc + (size_t)h * d;
                    for (int i = 0; i < d; i++) ah[i] += p * vj[i];
                }
            }
            for (int h = 0; h < group; h++) {
                float total = 0.f;
                const float* w = work + (size_t)h * used;
                for (int j = 0; j < used; j++) total += w[j];
                uint16_t* o = out + ((size_t)r * heads + (size_t)g * group + h) * d;
                for (int i = 0; i < d; i++) o[i] = f2bf(acc[(size_t)h * d + i] / total);
            }
        }
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
