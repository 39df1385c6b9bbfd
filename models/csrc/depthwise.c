/*
 * Depthwise 'same' convolutions (stride 1, odd square kernel, any dilation) on channels_last
 * float32 maps, for VAN's LKA and MLP on CPU. Built and loaded by models/native_kernels.py.
 *
 * Layouts: maps are (N, H, W, C) contiguous (a channels_last tensor's storage); weights are
 * tap-major (K*K, C) so that the innermost loop runs over contiguous channels. C must be a
 * multiple of 8: channels go in blocks of 8 floats (one AVX2 register; two NEON registers).
 * GCC vector extensions keep the file portable across x86 and ARM hosts.
 *
 * Why not oneDNN: its channels_last depthwise kernels read and write the big MLP maps several
 * times and have no dilated kernel; these loops touch each map once per pass and block four
 * output pixels per weight load, which the 2-core development VM measured 2-4x faster
 * (numbers in models/fast_conv.py).
 */
#include <stddef.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8f __attribute__((vector_size(32), aligned(4)));

/* aligned(4): unaligned vector loads and stores (built with -fno-strict-aliasing). */
static inline v8f load8(const float *p) { return *(const v8f *)p; }
static inline void store8(float *p, v8f v) { *(v8f *)p = v; }
static inline v8f splat8(float s) { v8f v = {s, s, s, s, s, s, s, s}; return v; }

/* ---- GELU (erf form), fused into the MLP's depthwise conv ---------------------------------- */
typedef int v8i __attribute__((vector_size(32), aligned(4)));

/* e^x to about 2e-7 relative: x = n ln2 + r with |r| <= ln2/2, Taylor series to r^6, 2^n in the
 * exponent bits. Arguments below -87 give 0 (they underflow float32 anyway). */
static inline v8f exp8(v8f x)
{
    const v8f lo = splat8(-87.0f), hi = splat8(88.0f), magic = splat8(12582912.0f); /* 1.5 * 2^23 */
    v8i below = x < lo;
    x = (v8f)(((v8i)x & ~below) | ((v8i)lo & below));
    x = (v8f)(((v8i)x & ~(v8i)(x > hi)) | ((v8i)hi & (v8i)(x > hi)));
    v8f n = (x * splat8(1.44269504088896341f) + magic) - magic; /* round to nearest */
    v8f r = x - n * splat8(0.693145751953125f) - n * splat8(1.42860682030941723212e-6f);
    v8f p = splat8(1.f / 720);
    p = p * r + splat8(1.f / 120);
    p = p * r + splat8(1.f / 24);
    p = p * r + splat8(1.f / 6);
    p = p * r + splat8(0.5f);
    p = p * r + splat8(1.f);
    p = p * r + splat8(1.f);
    v8i scale = (__builtin_convertvector(n, v8i) + 127) << 23;
    return (v8f)((v8i)(p * (v8f)scale) & ~below);
}

/* erf(x) to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26, as PyTorch's vectorized erf), and
 * *gauss = e^(-x^2), which GELU's derivative needs too. */
static inline v8f erf8(v8f x, v8f *gauss)
{
    const v8i sign = (v8i)splat8(-0.f);
    v8f ax = (v8f)((v8i)x & ~sign);
    v8f t = splat8(1.f) / (splat8(1.f) + splat8(0.3275911f) * ax);
    v8f poly = splat8(1.061405429f);
    poly = poly * t + splat8(-1.453152027f);
    poly = poly * t + splat8(1.421413741f);
    poly = poly * t + splat8(-0.284496736f);
    poly = poly * t + splat8(0.254829592f);
    *gauss = exp8(-(x * x));
    v8f e = splat8(1.f) - poly * t * *gauss;
    return (v8f)((v8i)e | ((v8i)x & sign));
}

/* GELU(a) = a/2 (1 + erf(a/sqrt 2)). */
static inline v8f gelu8(v8f a)
{
    v8f gauss;
    return splat8(0.5f) * a * (splat8(1.f) + erf8(a * splat8(0.70710678118654752f), &gauss));
}

/* GELU'(a) = (1 + erf(a/sqrt 2))/2 + a e^(-a^2/2) / sqrt(2 pi). */
static inline v8f gelu_grad8(v8f a)
{
    v8f gauss;
    v8f cdf = splat8(0.5f) * (splat8(1.f) + erf8(a * splat8(0.70710678118654752f), &gauss));
    return cdf + a * gauss * splat8(0.39894228040143268f);
}

/* out = g * GELU'(a), n a multiple of 8. */
void van_gelu_backward(const float *a, const float *g, float *out, long n, int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long k = 0; k < n; k += 8) store8(out + k, load8(g + k) * gelu_grad8(load8(a + k)));
}

/* Output pixels [w, w + B) of row h, channels [c, c + 8), all of whose taps lie inside the map.
 * K, D, B are constants where this is inlined: each input pixel is loaded once per kernel row and
 * multiplied into every output it feeds, with the K weights and B sums held in registers. Loading
 * each input once per tap instead made the kernel bound by L2 traffic (channel strides of 1-2 KB
 * map a row's pixels onto a few L1 sets). */
static inline __attribute__((always_inline)) void forward_block(
    const float *x, const float *w_taps, const float *bias, float *yrow,
    int H, int W, int C, int h, int w, int c, const int K, const int D, const int B)
{
    const int r = K / 2;
    v8f acc[8], wv[7];
    v8f b = bias ? load8(bias + c) : splat8(0.f);
#pragma GCC unroll 8
    for (int o = 0; o < B; o++) acc[o] = b;
    for (int i = 0; i < K; i++) {
        int hh = h + D * (i - r);
        if (hh < 0 || hh >= H) continue;
        const float *xr = x + ((size_t)hh * W + w) * C + c;
#pragma GCC unroll 7
        for (int j = 0; j < K; j++) wv[j] = load8(w_taps + (size_t)(i * K + j) * C + c);
#pragma GCC unroll 32
        for (int p = -D * r; p < B + D * r; p++) {
            v8f xv = load8(xr + (ptrdiff_t)p * C);
#pragma GCC unroll 7
            for (int j = 0; j < K; j++) {
                int o = p - D * (j - r);
                if (o >= 0 && o < B) acc[o] += wv[j] * xv;
            }
        }
    }
#pragma GCC unroll 8
    for (int o = 0; o < B; o++) store8(yrow + (size_t)(w + o) * C + c, acc[o]);
}

/* One output pixel, any kernel, taps outside the map skipped; four channel blocks at a time where
 * C allows, for independent chains of sums. */
static void forward_pixel(const float *x, const float *w_taps, const float *bias, float *yrow,
                          int H, int W, int C, int K, int dil, int h, int w)
{
    const int r = K / 2;
    int c = 0;
    for (; c + 32 <= C; c += 32) {
        v8f a[4];
        for (int q = 0; q < 4; q++) a[q] = bias ? load8(bias + c + 8 * q) : splat8(0.f);
        for (int i = 0; i < K; i++) {
            int hh = h + dil * (i - r);
            if (hh < 0 || hh >= H) continue;
            for (int j = 0; j < K; j++) {
                int ww = w + dil * (j - r);
                if (ww < 0 || ww >= W) continue;
                const float *xp = x + ((size_t)hh * W + ww) * C + c, *wp = w_taps + (size_t)(i * K + j) * C + c;
                for (int q = 0; q < 4; q++) a[q] += load8(wp + 8 * q) * load8(xp + 8 * q);
            }
        }
        for (int q = 0; q < 4; q++) store8(yrow + (size_t)w * C + c + 8 * q, a[q]);
    }
    for (; c < C; c += 8) {
        v8f a = bias ? load8(bias + c) : splat8(0.f);
        for (int i = 0; i < K; i++) {
            int hh = h + dil * (i - r);
            if (hh < 0 || hh >= H) continue;
            for (int j = 0; j < K; j++) {
                int ww = w + dil * (j - r);
                if (ww < 0 || ww >= W) continue;
                a += load8(w_taps + (size_t)(i * K + j) * C + c) * load8(x + ((size_t)hh * W + ww) * C + c);
            }
        }
        store8(yrow + (size_t)w * C + c, a);
    }
}

#define FORWARD_ROW(K, D, B)                                                                        \
    static void forward_row_##K##_##D(const float *x, const float *w_taps, const float *bias,       \
                                      float *yrow, int H, int W, int C, int h)                      \
    {                                                                                               \
        int lo = D * (K / 2), w = 0;                                                                \
        for (; w < lo && w < W; w++) forward_pixel(x, w_taps, bias, yrow, H, W, C, K, D, h, w);     \
        for (; w + B + D * (K / 2) <= W; w += B)                                                    \
            for (int c = 0; c < C; c += 8) forward_block(x, w_taps, bias, yrow, H, W, C, h, w, c, K, D, B); \
        for (; w < W; w++) forward_pixel(x, w_taps, bias, yrow, H, W, C, K, D, h, w);               \
    }
/* VAN's three kernels: MLP 3x3, LKA 5x5, LKA 7x7 dilated by 3 (B: outputs per block, as many as
 * the 16 AVX2 registers hold with the K weights). */
FORWARD_ROW(3, 1, 8)
FORWARD_ROW(5, 1, 8)
FORWARD_ROW(7, 3, 6)

/* Output row (n, h): y[w, c] = bias[c] + sum over live taps of w_taps[tap, c] * x[h + dil*(i-r), w + dil*(j-r), c]. */
static void forward_row(const float *x, const float *w_taps, const float *bias, float *y,
                        int H, int W, int C, int K, int dil, int h)
{
    if (K == 3 && dil == 1) forward_row_3_1(x, w_taps, bias, y, H, W, C, h);
    else if (K == 5 && dil == 1) forward_row_5_1(x, w_taps, bias, y, H, W, C, h);
    else if (K == 7 && dil == 3) forward_row_7_3(x, w_taps, bias, y, H, W, C, h);
    else for (int w = 0; w < W; w++) forward_pixel(x, w_taps, bias, y, H, W, C, K, dil, h, w);
}

/* y = conv(x); bias may be NULL. x and y: (N, H, W, C); w_taps: (K*K, C). When act is not NULL it
 * also receives GELU(y), computed while each row of y is still in cache. */
void van_dw_forward(const float *x, const float *w_taps, const float *bias, float *y, float *act,
                    int N, int H, int W, int C, int K, int dil, int threads)
{
    const size_t map = (size_t)H * W * C, row_len = (size_t)W * C;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < (long)N * H; row++) {
        int n = (int)(row / H), h = (int)(row % H);
        float *yrow = y + n * map + (size_t)h * row_len;
        forward_row(x + n * map, w_taps, bias, yrow, H, W, C, K, dil, h);
        if (act) {
            float *arow = act + n * map + (size_t)h * row_len;
            for (size_t k = 0; k < row_len; k += 8) store8(arow + k, gelu8(load8(yrow + k)));
        }
    }
}

/* Adds sum over w in [wa, wb) of x[hh, w + off, c] * g[w, c] to gwp[c] for every channel,
 * skipping the w where the tap reads outside the map. */
static void tap_sum(const float *xrow, const float *grow, float *gwp, int W, int C, int off, int wa, int wb)
{
    if (wa < -off) wa = -off;
    if (wb > W - off) wb = W - off;
    if (wb <= wa) return;
    for (int c = 0; c < C; c += 8) {
        /* Four independent sums hide the FMA latency. */
        v8f a0 = splat8(0.f), a1 = a0, a2 = a0, a3 = a0;
        int w = wa;
        for (; w + 4 <= wb; w += 4) {
            const float *xp = xrow + (size_t)(w + off) * C + c, *gp = grow + (size_t)w * C + c;
            a0 += load8(xp) * load8(gp);
            a1 += load8(xp + C) * load8(gp + C);
            a2 += load8(xp + 2 * C) * load8(gp + 2 * C);
            a3 += load8(xp + 3 * C) * load8(gp + 3 * C);
        }
        for (; w < wb; w++)
            a0 += load8(xrow + (size_t)(w + off) * C + c) * load8(grow + (size_t)w * C + c);
        store8(gwp + c, load8(gwp + c) + ((a0 + a1) + (a2 + a3)));
    }
}

/* Weight gradient of one kernel row (taps i*K .. i*K+K-1) from output pixels [wa, wb) of a row,
 * every one of whose taps lies inside the map; channels [c, c + 8). As in forward_block, each input
 * pixel is loaded once and meets the B output gradients held in registers; A interleaved sums per
 * tap hide the FMA latency. */
static inline __attribute__((always_inline)) void weight_grad_blocks(
    const float *xrow, const float *grow, float *gw_row, int C, int c, int wa, int wb,
    const int K, const int D, const int B, const int A)
{
    const int r = K / 2;
    v8f acc[7][2], gv[8];
#pragma GCC unroll 7
    for (int j = 0; j < K; j++)
#pragma GCC unroll 2
        for (int q = 0; q < A; q++) acc[j][q] = splat8(0.f);
    for (int w = wa; w + B <= wb; w += B) {
#pragma GCC unroll 8
        for (int o = 0; o < B; o++) gv[o] = load8(grow + (size_t)(w + o) * C + c);
        const float *xr = xrow + (size_t)w * C + c;
#pragma GCC unroll 32
        for (int p = -D * r; p < B + D * r; p++) {
            v8f xv = load8(xr + (ptrdiff_t)p * C);
#pragma GCC unroll 7
            for (int j = 0; j < K; j++) {
                int o = p - D * (j - r);
                if (o >= 0 && o < B) acc[j][o % A] += xv * gv[o];
            }
        }
    }
#pragma GCC unroll 7
    for (int j = 0; j < K; j++) {
        v8f sum = acc[j][0];
        if (A > 1) sum += acc[j][1];
        store8(gw_row + (size_t)j * C + c, load8(gw_row + (size_t)j * C + c) + sum);
    }
}

#define WEIGHT_GRAD_ROW(K, D, B, A)                                                                 \
    static int weight_grad_row_##K##_##D(const float *xrow, const float *grow, float *gw_row,      \
                                         int W, int C)                                              \
    {                                                                                               \
        int lo = D * (K / 2), blocks = (W - 2 * lo) / B;                                            \
        if (blocks <= 0) return 0;                                                                  \
        for (int c = 0; c < C; c += 8)                                                              \
            weight_grad_blocks(xrow, grow, gw_row, C, c, lo, lo + blocks * B, K, D, B, A);          \
        for (int j = 0; j < K; j++) { /* the columns the blocks left out */                         \
            tap_sum(xrow, grow, gw_row + (size_t)j * C, W, C, D * (j - K / 2), 0, lo);              \
            tap_sum(xrow, grow, gw_row + (size_t)j * C, W, C, D * (j - K / 2), lo + blocks * B, W); \
        }                                                                                           \
        return 1;                                                                                   \
    }
WEIGHT_GRAD_ROW(3, 1, 8, 2)
WEIGHT_GRAD_ROW(5, 1, 4, 2)
WEIGHT_GRAD_ROW(7, 3, 4, 1)

/* Adds output row (n, h)'s contribution to the tap-major weight gradient gw (K*K, C) and to gb (C). */
static void weight_grad_row(const float *x, const float *g, float *gw, float *gb,
                            int H, int W, int C, int K, int dil, int h)
{
    const int r = K / 2;
    const float *grow = g + (size_t)h * W * C;
    if (gb) {
        for (int c = 0; c < C; c += 8) {
            v8f acc = splat8(0.f);
            for (int w = 0; w < W; w++) acc += load8(grow + (size_t)w * C + c);
            store8(gb + c, load8(gb + c) + acc);
        }
    }
    for (int i = 0; i < K; i++) {
        int hh = h + dil * (i - r);
        if (hh < 0 || hh >= H) continue;
        const float *xrow = x + (size_t)hh * W * C;
        float *gw_row = gw + (size_t)i * K * C;
        int done = 0;
        if (K == 3 && dil == 1) done = weight_grad_row_3_1(xrow, grow, gw_row, W, C);
        else if (K == 5 && dil == 1) done = weight_grad_row_5_1(xrow, grow, gw_row, W, C);
        else if (K == 7 && dil == 3) done = weight_grad_row_7_3(xrow, grow, gw_row, W, C);
        if (!done)
            for (int j = 0; j < K; j++) tap_sum(xrow, grow, gw_row + (size_t)j * C, W, C, dil * (j - r), 0, W);
    }
}

/* gw (K*K, C) = weight gradient, gb (C) = bias gradient (skipped when NULL) of y = conv(x) given
 * dL/dy = g. scratch holds threads * (K*K + 1) * C floats of per-thread partial sums. */
void van_dw_weight_grad(const float *x, const float *g, float *gw, float *gb, float *scratch,
                        int N, int H, int W, int C, int K, int dil, int threads)
{
    const size_t map = (size_t)H * W * C, part = (size_t)(K * K + 1) * C;
    memset(scratch, 0, sizeof(float) * part * threads);
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        float *mine = scratch + part * t;
        long rows = (long)N * H, first = rows * t / nt, last = rows * (t + 1) / nt;
        for (long row = first; row < last; row++) {
            int n = (int)(row / H), h = (int)(row % H);
            weight_grad_row(x + n * map, g + n * map, mine, gb ? mine + (size_t)K * K * C : NULL,
                            H, W, C, K, dil, h);
        }
    }
    /* Fixed-order reduction: the result does not depend on thread timing. */
    memcpy(gw, scratch, sizeof(float) * K * K * C);
    if (gb) memcpy(gb, scratch + (size_t)K * K * C, sizeof(float) * C);
    for (int t = 1; t < threads; t++) {
        const float *p = scratch + part * t;
        for (size_t k = 0; k < (size_t)K * K * C; k++) gw[k] += p[k];
        if (gb) for (int c = 0; c < C; c++) gb[c] += p[(size_t)K * K * C + c];
    }
}
