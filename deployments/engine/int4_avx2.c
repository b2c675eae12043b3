/* Q4_1 weights x 16-bit activations on x86 AVX2: the CPU's int4 matmul (see cpu_int4.py).
 *
 * Weights, per output and group of 32 inputs: 4-bit codes q, a scale d and a minimum m in fp16,
 * so weight = m + q * d (GGUF's Q4_1). Activations are quantized per row and group of 32 to int16
 * codes a = round(x * 32258 / amax) (|a| <= 32258 = 127 * 254) at the scale xd = amax / 32258,
 * so a group's dot product is integer:
 *     sum_j w_j x_j ~= d * xd * sum_j q_j a_j  +  m * xd * sum_j a_j
 * `_mm256_madd_epi16` multiplies 16 codes by 16 activations and adds pairs in int32, exactly.
 *
 * Why 16-bit activations, not llama.cpp's 8 (Q8_1, half the integer work): SmolLM2's first answer
 * token to "What is the capital of France?" is "The" by 0.08 over "L" in fp32, by 0.03 with 8-bit
 * groups of 32, and flips with 8-bit groups of 16 (llama.cpp itself answers "L'Étoile, ..." on the
 * packaged GGUF); with 16 bits the margin is fp32's to 0.002.
 *
 * The layout puts outputs in the vector lanes, so a group's sums need no horizontal adds: codes
 * are stored per block of 8 outputs and group, as 8 vectors of 16 bytes (`cpu_int4.pack`). Byte
 * i of vector c holds output i / 2's codes for input 2c + i % 2 (low nibble) and 16 + 2c + i % 2
 * (high nibble). Widened to 16 bits, its low nibbles times the activation pair (2c, 2c + 1)
 * broadcast to every lane give, by `madd`, each of the 8 outputs' sum over those two inputs; 8
 * vectors of two such products make the group. Per block, group and row that is 16 `madd` and no
 * shuffles; the unpacked codes serve up to ROW_BLOCK rows. The scales and minimums of a block's
 * group are 8 fp16 side by side, one per lane. On the project's 2-core AVX2 EPYC one pass over
 * SmolLM2's layers and int4 head took 1.5-1.7x less time than with the earlier layout (outputs
 * one at a time, groups in the lanes, added across by `hadd`) at 1, 4 and 16 rows.
 *
 * Every row's arithmetic is the same whatever the other rows are: a result never depends on the
 * batch.
 *
 * Where the CPU has AVX-512 with VNNI (AMD Zen 4 and 5, Intel's server cores), `block_rows_wide`
 * takes two blocks at once, 16 outputs to a 512-bit vector, and adds each product pair into the
 * sums with one `vpdpwssd` (VNNI's fused `madd` and add, exact in int32 as they are). Each output's
 * operations are the AVX2 path's, in the same order, so it gives the same bits (a test holds it
 * to that) at under half the instructions.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define STEPS 32258.0f
/* Rows whose sums run together over one block's unpacked codes: 2 x 4 accumulators, the codes and
 * their temporaries fit AVX2's 16 vector registers. */
#define ROW_BLOCK 4
/* The same for `block_rows_wide`: 2 x 12 accumulators in AVX-512's 32 registers (at 16 rows
 * 6.6-6.9 ms a pass over SmolLM2's layers, against 8.2 with 8 + 8, on the Zen 5 EPYC). */
#define ROW_BLOCK_WIDE 12

/* One row: per group the codes, the scale xd and xs = xd * sum(codes). */
static void quantize_row(const float *x, int groups, int16_t *codes, float *xd, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int g = 0; g < groups; g++) {
        const float *v = x + 32 * g;
        __m256 a[4] = {_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8), _mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24)};
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        __m256 inverse = _mm256_set1_ps(amax > 0.0f ? STEPS / amax : 0.0f);
        __m256i c[4], sum = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            /* Rounds to nearest, ties to even (the default MXCSR mode), as torch.round does. */
            c[k] = _mm256_cvtps_epi32(_mm256_mul_ps(a[k], inverse));
            sum = _mm256_add_epi32(sum, c[k]);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* packs interleaves the 128-bit lanes; the permutation puts the codes back in order. */
        _mm256_storeu_si256((__m256i *)(codes + 32 * g), _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8));
        _mm256_storeu_si256((__m256i *)(codes + 32 * g + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8));
        xd[g] = amax / STEPS;
        xs[g] = xd[g] * (float)_mm_cvtsi128_si32(s4);
    }
}

/* One matmul, shared out among the OpenMP threads by contiguous ranges of output blocks. */
typedef struct {
    const uint8_t *packed;
    const uint16_t *scales, *minimums;
    const float *bias, *xd, *xs;
    const int16_t *codes;
    float *out;
    int rows, in_features, out_features, parts;
} job_t;

/* Whether matmuls take `block_rows_wide` (see `int4_use_wide`). */
static int use_wide = 0;

/* Two adjacent activation codes in every 32-bit lane. */
static inline __m256i pair(const int16_t *a) { return _mm256_set1_epi32(*(const int32_t *)a); }

/* Rows [r0, r0 + n) (n <= ROW_BLOCK) of block b's 8 outputs: per group the integer sums (a
 * group's is under 2^24 in magnitude: 32 * 15 * 32258, so it converts to fp32 exactly), then
 * acc += m * xs + d * xd * sum. */
static inline void block_rows(const job_t *job, int b, int r0, int n) {
    const int groups = job->in_features / 32, in_features = job->in_features;
    const uint8_t *w = job->packed + (size_t)b * groups * 128;
    const uint16_t *d = job->scales + (size_t)b * groups * 8, *m = job->minimums + (size_t)b * groups * 8;
    __m256 acc[ROW_BLOCK];
    for (int r = 0; r < n; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i dots[ROW_BLOCK];
        for (int r = 0; r < n; r++) dots[r] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 128 * g + 16 * c)));
            __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)), high = _mm256_srli_epi16(bytes, 4);
            for (int r = 0; r < n; r++) {
                const int16_t *a = job->codes + (size_t)(r0 + r) * in_features + 32 * g + 2 * c;
                dots[r] = _mm256_add_epi32(dots[r], _mm256_add_epi32(_mm256_madd_epi16(low, pair(a)), _mm256_madd_epi16(high, pair(a + 16))));
            }
        }
        __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + 8 * g)));
        __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + 8 * g)));
        for (int r = 0; r < n; r++) {
            const int q = (r0 + r) * groups + g;
            __m256 with_minimum = _mm256_fmadd_ps(m8, _mm256_set1_ps(job->xs[q]), acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_set1_ps(job->xd[q])), _mm256_cvtepi32_ps(dots[r]), with_minimum);
        }
    }
    for (int r = 0; r < n; r++) {
        __m256 result = job->bias ? _mm256_add_ps(acc[r], _mm256_loadu_ps(job->bias + 8 * b)) : acc[r];
        _mm256_storeu_ps(job->out + (size_t)(r0 + r) * job->out_features + 8 * b, result);
    }
}

/* Two adjacent activation codes in every 32-bit lane of a 512-bit vector. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline __m512i pair_wide(const int16_t *a) { return _mm512_set1_epi32(*(const int32_t *)a); }

/* Two blocks' 8 lanes (block b's, then b + 1's) of what lies `stride` apart per block. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline __m256i two_blocks(const void *first, size_t stride) {
    return _mm256_set_m128i(_mm_loadu_si128((const __m128i *)((const uint8_t *)first + stride)), _mm_loadu_si128((const __m128i *)first));
}

/* `block_rows` for blocks b and b + 1 together (n <= ROW_BLOCK_WIDE): lanes 0-7 are block b's
 * outputs, 8-15 block b + 1's, and each lane's arithmetic is `block_rows`' in its order. */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline void block_rows_wide(const job_t *job, int b, int r0, int n) {
    const int groups = job->in_features / 32, in_features = job->in_features;
    const size_t codes_stride = (size_t)groups * 128, lanes_stride = (size_t)groups * 8 * sizeof(uint16_t);
    const uint8_t *w = job->packed + (size_t)b * codes_stride;
    const uint16_t *d = job->scales + (size_t)b * groups * 8, *m = job->minimums + (size_t)b * groups * 8;
    __m512 acc[ROW_BLOCK_WIDE];
    for (int r = 0; r < n; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i dots[ROW_BLOCK_WIDE];
        for (int r = 0; r < n; r++) dots[r] = _mm512_setzero_si512();
        #pragma GCC unroll 8  /* else GCC keeps this loop from 4 rows on, at 1.5x the time */
        for (int c = 0; c < 8; c++) {
            __m512i bytes = _mm512_cvtepu8_epi16(two_blocks(w + 128 * g + 16 * c, codes_stride));
            __m512i low = _mm512_and_si512(bytes, _mm512_set1_epi16(0x0F)), high = _mm512_srli_epi16(bytes, 4);
            for (int r = 0; r < n; r++) {
                const int16_t *a = job->codes + (size_t)(r0 + r) * in_features + 32 * g + 2 * c;
                dots[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(dots[r], low, pair_wide(a)), high, pair_wide(a + 16));
            }
        }
        __m512 d16 = _mm512_cvtph_ps(two_blocks(d + 8 * g, lanes_stride));
        __m512 m16 = _mm512_cvtph_ps(two_blocks(m + 8 * g, lanes_stride));
        for (int r = 0; r < n; r++) {
            const int q = (r0 + r) * groups + g;
            __m512 with_minimum = _mm512_fmadd_ps(m16, _mm512_set1_ps(job->xs[q]), acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d16, _mm512_set1_ps(job->xd[q])), _mm512_cvtepi32_ps(dots[r]), with_minimum);
        }
    }
    for (int r = 0; r < n; r++) {
        __m512 result = job->bias ? _mm512_add_ps(acc[r], _mm512_loadu_ps(job->bias + 8 * b)) : acc[r];
        _mm512_storeu_ps(job->out + (size_t)(r0 + r) * job->out_features + 8 * b, result);
    }
}

/* Blocks [first, last) two at a time, a last odd one by `block_rows`. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void run_blocks_wide(const job_t *job, int first, int last) {
    for (int b = first; b < last; b += 2)
        for (int r0 = 0; r0 < job->rows; r0 += ROW_BLOCK_WIDE) {
            int n = job->rows - r0 < ROW_BLOCK_WIDE ? job->rows - r0 : ROW_BLOCK_WIDE;
            if (b + 1 == last) {
                for (int r = r0; r < r0 + n; r++) block_rows(job, b, r, 1);
                continue;
            }
            switch (n) {  /* constant row counts, as in `run_part` */
                case 12: block_rows_wide(job, b, r0, 12); break;
                case 11: block_rows_wide(job, b, r0, 11); break;
                case 10: block_rows_wide(job, b, r0, 10); break;
                case 9: block_rows_wide(job, b, r0, 9); break;
                case 8: block_rows_wide(job, b, r0, 8); break;
                case 7: block_rows_wide(job, b, r0, 7); break;
                case 6: block_rows_wide(job, b, r0, 6); break;
                case 5: block_rows_wide(job, b, r0, 5); break;
                case 4: block_rows_wide(job, b, r0, 4); break;
                case 3: block_rows_wide(job, b, r0, 3); break;
                case 2: block_rows_wide(job, b, r0, 2); break;
                default: block_rows_wide(job, b, r0, 1);
            }
        }
}

static void run_part(const job_t *job, int part) {
    const int blocks = job->out_features / 8;
    int first = (int)((long)blocks * part / job->parts), last = (int)((long)blocks * (part + 1) / job->parts);
    /* One row stays on AVX2: its pass streams the weights from memory, and two blocks at once
     * took longer (SmolLM2's layers on a 2-core Zen 5 EPYC: 2.29 vs 2.18 ms; from 2 rows 2.52 vs
     * 2.96, at 8 rows 3.6-3.8 vs 7.7, at 16 6.6-6.9 vs 14.5). */
    if (use_wide && job->rows > 1) {
        /* Parts start on even blocks, so pairs stay whole. */
        first &= ~1;
        last = part + 1 == job->parts ? blocks : last & ~1;
        run_blocks_wide(job, first, last);
        return;
    }
    for (int b = first; b < last; b++)
        for (int r0 = 0; r0 < job->rows; r0 += ROW_BLOCK) {
            int n = job->rows - r0 < ROW_BLOCK ? job->rows - r0 : ROW_BLOCK;
            switch (n) {  /* constant row counts: the compiler keeps the accumulators in registers */
                case 4: block_rows(job, b, r0, 4); break;
                case 3: block_rows(job, b, r0, 3); break;
                case 2: block_rows(job, b, r0, 2); break;
                default: block_rows(job, b, r0, 1);
            }
        }
}

/* Whether this CPU runs `block_rows_wide` (AVX-512 BW and VNNI). */
int int4_wide_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

/* Makes every matmul after it take the AVX-512 path (`on`, where supported) or the AVX2 one;
 * returns which it takes. */
int int4_use_wide(int on) {
    use_wide = on && int4_wide_supported();
    return use_wide;
}

/* out[r][o] = sum_k w[o][k] x[r][k] (+ bias[o]) for rows r; in_features % 32 == 0, out_features
 * % 8 == 0; x and out fp32, row-major, on `threads` OpenMP threads. Returns 0, or -1 when out of
 * memory. */
int int4_matmul(const uint8_t *packed, const uint16_t *scales, const uint16_t *minimums, const float *bias,
                const float *x, float *out, int rows, int in_features, int out_features, int threads) {
    const int groups = in_features / 32;
    int16_t *codes = malloc(sizeof(int16_t) * rows * in_features);
    float *xd = malloc(sizeof(float) * rows * groups), *xs = malloc(sizeof(float) * rows * groups);
    int status = -1;
    if (codes && xd && xs) {
        for (int r = 0; r < rows; r++)
            quantize_row(x + (size_t)r * in_features, groups, codes + (size_t)r * in_features, xd + r * groups, xs + r * groups);
        job_t job = {packed, scales, minimums, bias, xd, xs, codes, out, rows, in_features, out_features, threads};
        #pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int part = 0; part < threads; part++) run_part(&job, part);
        status = 0;
    }
    free(codes);
    free(xd);
    free(xs);
    return status;
}
