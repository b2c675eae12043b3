/* Q4_1 weights x 16-bit activations on x86 AVX2: the CPU decode step's matmul (see cpu_int4.py).
 *
 * Weights, per output row and group of 32 inputs: 16 bytes of 4-bit codes q (input j in the low
 * nibble of byte j, input 16 + j in the high nibble: GGUF Q4_1's order), a scale d and a minimum
 * m in fp16, so weight = m + q * d. Activations are quantized per row and group of 32 to int16
 * codes a = round(x * 32258 / amax) (|a| <= 32258 = 127 * 254) at the scale xd = amax / 32258,
 * so a group's dot product is integer:
 *     sum_j w_j x_j ~= d * xd * sum_j q_j a_j  +  m * xd * sum_j a_j
 * `_mm256_madd_epi16` multiplies 16 codes by 16 activations and adds pairs in int32, exactly.
 *
 * Why 16-bit activations, not llama.cpp's 8 (Q8_1, half the integer work): SmolLM2's first answer
 * token to "What is the capital of France?" is "The" by 0.08 over "L" in fp32, by 0.03 with 8-bit
 * groups of 32, and flips with 8-bit groups of 16 (llama.cpp itself answers "L'Étoile, ..." on the
 * packaged GGUF); with 16 bits the margin is fp32's to 0.002. At one row the weights' bytes set the
 * time, so the wider activations cost nothing there.
 *
 * Each output is computed for all rows while its unpacked codes are at hand, eight groups at a
 * time, so more rows cost less than one more pass each. Every row's arithmetic is the same
 * whatever the other rows are: a result never depends on the batch.
 */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#define STEPS 32258.0f

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

/* A group's 32 weight codes as two vectors of 16-bit integers, in input order. */
static inline void unpack(const uint8_t *packed, __m256i q[2]) {
    __m128i raw = _mm_loadu_si128((const __m128i *)packed), low = _mm_set1_epi8(0x0F);
    q[0] = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
    q[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
}

/* One group's integer dot product as 8 partial sums (a group's total is under 2^24 in magnitude:
 * 32 * 15 * 32258, so it converts to fp32 exactly). */
static inline __m256i group_dot(const __m256i q[2], const int16_t *a) {
    return _mm256_add_epi32(_mm256_madd_epi16(q[0], _mm256_loadu_si256((const __m256i *)a)),
                            _mm256_madd_epi16(q[1], _mm256_loadu_si256((const __m256i *)(a + 16))));
}

/* Eight groups' dot products, one per lane. */
static inline __m256i eight_group_dots(const __m256i q[16], const int16_t *a) {
    __m256i h01 = _mm256_hadd_epi32(group_dot(q, a), group_dot(q + 2, a + 32));
    __m256i h23 = _mm256_hadd_epi32(group_dot(q + 4, a + 64), group_dot(q + 6, a + 96));
    __m256i h45 = _mm256_hadd_epi32(group_dot(q + 8, a + 128), group_dot(q + 10, a + 160));
    __m256i h67 = _mm256_hadd_epi32(group_dot(q + 12, a + 192), group_dot(q + 14, a + 224));
    __m256i h0123 = _mm256_hadd_epi32(h01, h23), h4567 = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                            _mm256_permute2x128_si256(h0123, h4567, 0x31));
}

static inline int horizontal_sum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
}

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* One matmul, shared out among the OpenMP threads by contiguous ranges of outputs (one part each). */
typedef struct {
    const uint8_t *packed;
    const uint16_t *scales, *minimums;
    const float *bias, *xd, *xs;
    const int16_t *codes;
    float *out;
    int rows, in_features, out_features, parts;
    atomic_int failed;
} job_t;

static void run_part(job_t *job, int part) {
    const int rows = job->rows, in_features = job->in_features, out_features = job->out_features;
    const int groups = in_features / 32, octets = groups / 8;
    const int first = (int)((long)out_features * part / job->parts), last = (int)((long)out_features * (part + 1) / job->parts);
    if (first == last) return;
    /* Per row: the fp32 sum over whole octets of groups (8 lanes), then the leftover groups. */
    __m256 *acc = aligned_alloc(32, sizeof(__m256) * rows);
    float *rest = malloc(sizeof(float) * rows);
    if (!acc || !rest) {
        atomic_store(&job->failed, 1);
        free(acc);
        free(rest);
        return;
    }
    const int16_t *codes = job->codes;
    const float *xd = job->xd, *xs = job->xs;
    for (int o = first; o < last; o++) {
        const uint8_t *wq = job->packed + (size_t)o * groups * 16;
        const uint16_t *d = job->scales + (size_t)o * groups, *m = job->minimums + (size_t)o * groups;
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps(), rest[r] = 0.0f;
        for (int g = 0; g < 8 * octets; g += 8) {
            __m256i q[16];
            for (int j = 0; j < 8; j++) unpack(wq + 16 * (g + j), q + 2 * j);
            __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g)));
            __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + g)));
            for (int r = 0; r < rows; r++) {
                __m256 dots = _mm256_cvtepi32_ps(eight_group_dots(q, codes + (size_t)r * in_features + 32 * g));
                __m256 with_minimums = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xs + r * groups + g), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_loadu_ps(xd + r * groups + g)), dots, with_minimums);
            }
        }
        for (int g = 8 * octets; g < groups; g++) {
            __m256i q[2];
            unpack(wq + 16 * g, q);
            float dg = _cvtsh_ss(d[g]), mg = _cvtsh_ss(m[g]);
            for (int r = 0; r < rows; r++) {
                int dot = horizontal_sum_epi32(group_dot(q, codes + (size_t)r * in_features + 32 * g));
                rest[r] += dg * xd[r * groups + g] * (float)dot + mg * xs[r * groups + g];
            }
        }
        for (int r = 0; r < rows; r++)
            job->out[(size_t)r * out_features + o] = horizontal_sum(acc[r]) + rest[r] + (job->bias ? job->bias[o] : 0.0f);
    }
    free(acc);
    free(rest);
}

/* x * (1 / sqrt(mean(x^2) + eps)) * weight into `normed`: the RMSNorm before a Llama layer's
 * matmuls, fused here because as torch ops it cost ~60 us a call at one row (~5 small ops). */
static void rms_norm(const float *x, int n, const float *weight, float eps, float *normed) {
    __m256 squares = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    __m256 scale = _mm256_set1_ps(1.0f / sqrtf(horizontal_sum(squares) / (float)n + eps));
    for (int k = 0; k < n; k += 8)
        _mm256_storeu_ps(normed + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), scale), _mm256_loadu_ps(weight + k)));
}

/* out[r][o] = sum_k w[o][k] y[r][k] (+ bias[o]) for rows r, in_features % 32 == 0, where y is x, or
 * x's RMSNorm with `norm_weight` and `eps` when norm_weight is not NULL; x and out fp32, row-major,
 * on `threads` OpenMP threads. Returns 0, or -1 when out of memory. */
int int4_matmul(const uint8_t *packed, const uint16_t *scales, const uint16_t *minimums, const float *bias,
                const float *norm_weight, float eps, const float *x, float *out, int rows, int in_features,
                int out_features, int threads) {
    const int groups = in_features / 32;
    int16_t *codes = malloc(sizeof(int16_t) * rows * in_features);
    float *xd = malloc(sizeof(float) * rows * groups), *xs = malloc(sizeof(float) * rows * groups);
    float *normed = norm_weight ? malloc(sizeof(float) * in_features) : NULL;
    int status = -1;
    if (codes && xd && xs && (normed || !norm_weight)) {
        for (int r = 0; r < rows; r++) {
            const float *row = x + (size_t)r * in_features;
            if (norm_weight) {
                rms_norm(row, in_features, norm_weight, eps, normed);
                row = normed;
            }
            quantize_row(row, groups, codes + (size_t)r * in_features, xd + r * groups, xs + r * groups);
        }
        job_t job = {packed, scales, minimums, bias, xd, xs, codes, out, rows, in_features, out_features, threads, 0};
        #pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int part = 0; part < threads; part++) run_part(&job, part);
        status = atomic_load(&job.failed) ? -1 : 0;
    }
    free(codes);
    free(xd);
    free(xs);
    free(normed);
    return status;
}
