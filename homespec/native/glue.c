/* A quantized stage's decode glue: everything in a Llama layer but its four matrix products, in a few calls
   (homespec/native/__init__.py). Activations fp32, the products' inputs and outputs bf16 (torch's int4/int8 CPU
   kernels), attention in fp64 one row at a time (a row gets the same bits whatever rows ride with it and wherever
   its keys sit: model/stage.py). Plain C that compilers vectorize; no intrinsics, no threads. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
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
   allows, in fp64, one row at a time: out bf16 [n, heads * d] (fp64 -> fp32 -> bf16, as the torch path rounds) */
void hs_attend(const float* q, const float* kc, const float* vc, const uint8_t* mask, int n, int heads, int kvh,
               int d, int slots, int used, float scale, double* work, uint16_t* out) {
    int group = heads / kvh;
    double acc[512];
    for (int r = 0; r < n; r++) {
        const uint8_t* m = mask + (size_t)r * used;
        for (int hq = 0; hq < heads; hq++) {
            const float* qr = q + ((size_t)r * heads + hq) * d;
            const float* K = kc + (size_t)(hq / group) * slots * d;
            const float* V = vc + (size_t)(hq / group) * slots * d;
            double best = -INFINITY;
            for (int j = 0; j < used; j++) {
                if (!m[j]) continue;
                const float* kj = K + (size_t)j * d;
                double lane[8] = {0};
                for (int i = 0; i < d; i += 8)
                    for (int l = 0; l < 8; l++) lane[l] += (double)qr[i + l] * (double)kj[i + l];
                double sc = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
                sc *= (double)scale;
                work[j] = sc;
                if (sc > best) best = sc;
            }
            double total = 0.0;
            for (int i = 0; i < d; i++) acc[i] = 0.0;
            for (int j = 0; j < used; j++) {
                if (!m[j]) continue;
                double p = exp(work[j] - best);
                total += p;
                const float* vj = V + (size_t)j * d;
                for (int i = 0; i < d; i++) acc[i] += p * (double)vj[i];
            }
            uint16_t* o = out + (size_t)r * heads * d + (size_t)hq * d;
            for (int i = 0; i < d; i++) o[i] = f2bf((float)(acc[i] / total));
        }
    }
}

/* gu bf16 [n, 2 I] (gate | up) -> bf16 [n, I]: silu(gate) * up in fp32 */
void hs_silu_mul(const uint16_t* gu, int n, int inter, uint16_t* out) {
    for (int r = 0; r < n; r++) {
        const uint16_t* g = gu + (size_t)r * 2 * inter;
        const uint16_t* u = g + inter;
        for (int i = 0; i < inter; i++) {
            float x = bf2f(g[i]);
            out[(size_t)r * inter + i] = f2bf(x / (1.f + expf(-x)) * bf2f(u[i]));
        }
    }
}
