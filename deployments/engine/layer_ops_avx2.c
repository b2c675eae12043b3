/* A decoder layer's small ops on an x86 AVX2 CPU, in fp32 (see cpu_layer_ops.py): the same
 * three fused ops the GPU runs in Triton (fused_layer_ops.py), plus attention for decode rows.
 *
 * As torch ops a SmolLM2 decode step of one row spent ~5 ms of its ~19 in ~2,500 small calls
 * (RoPE through complex numbers, `index_copy_` into the cache, attention's two `bmm` over the
 * longest row's keys with a mask, softmax, SiLU, the residual adds), each a few microseconds of
 * dispatch for a few hundred floats of work. Here each op is one call per layer, and decode
 * attention reads each row's own keys only.
 *
 * Every row's arithmetic is the same whatever the other rows are: a result never depends on the
 * batch. Loops over rows run on `threads` OpenMP threads (torch's pool) when there are enough.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* e^x in fp32 for x <= 88.7, within ~2 ulp (Cephes' polynomial on x - n ln2, times 2^n). Below
 * -87.3 it returns ~2^-126 rather than 0, negligible next to a softmax's largest term, 1. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The KV cache of one layer: k and v [rows, n_kv_heads, capacity, head_dim] with these strides
 * (in floats; head_dim's is 1). */
typedef struct {
    float *k, *v;
    long row_stride, head_stride, position_stride;
} cache_t;

static inline long cache_offset(const cache_t *c, int64_t slot, int head, int64_t position) {
    return slot * c->row_stride + head * c->head_stride + position * c->position_stride;
}

/* qkv [n, (n_heads + 2 n_kv_heads) * head_dim] (row stride qkv_stride): RoPE on the q and k heads
 * in the interleaved layout (pair i is elements 2i and 2i + 1) with rope [context, head_dim / 2,
 * 2] (cos, sin); rotated queries into q [n, n_heads, head_dim], keys and values into the cache at
 * (slots[t], positions[t]). */
void rope_and_cache_write(const float *qkv, long qkv_stride, const float *rope, const int64_t *positions,
                          const int64_t *slots, float *q, float *k, float *v, long row_stride, long head_stride,
                          long position_stride, int n, int n_heads, int n_kv_heads, int head_dim, int threads) {
    const cache_t cache = {k, v, row_stride, head_stride, position_stride};
    #pragma omp parallel for num_threads(threads) if (n >= 64)
    for (int t = 0; t < n; t++) {
        const float *source = qkv + t * qkv_stride, *rotation = rope + positions[t] * head_dim;
        for (int head = 0; head < n_heads + 2 * n_kv_heads; head++) {
            const float *x = source + head * head_dim;
            float *target = head < n_heads ? q + ((long)t * n_heads + head) * head_dim
                            : head < n_heads + n_kv_heads ? cache.k + cache_offset(&cache, slots[t], head - n_heads, positions[t])
                            : cache.v + cache_offset(&cache, slots[t], head - n_heads - n_kv_heads, positions[t]);
            if (head >= n_heads + n_kv_heads) {  /* values: copied as they are */
                for (int i = 0; i < head_dim; i++) target[i] = x[i];
                continue;
            }
            /* x * rotation as complex numbers, as torch's complex64 multiply rounds it. */
            for (int i = 0; i < head_dim; i += 2) {
                float a = x[i], b = x[i + 1], cos = rotation[i], sin = rotation[i + 1];
                target[i] = a * cos - b * sin;
                target[i + 1] = a * sin + b * cos;
            }
        }
    }
}

/* Attention of n decode tokens over their own rows' keys: token t's query heads q [n, n_heads,
 * head_dim] (pre-scaled by 1 / sqrt(head_dim)) over positions 0..positions[t] of cache row
 * slots[t], query head h reading KV head h / (n_heads / n_kv_heads); out [n, n_heads, head_dim].
 * head_dim % 8 == 0. Returns 0, or -1 when out of memory. */
int decode_attention(const float *q, const float *k, const float *v, long row_stride, long head_stride,
                     long position_stride, const int64_t *slots, const int64_t *positions, float *out, int n,
                     int n_heads, int n_kv_heads, int head_dim, int threads) {
    const cache_t cache = {(float *)k, (float *)v, row_stride, head_stride, position_stride};
    const int group = n_heads / n_kv_heads;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (n * n_heads > 1)
    {
        int64_t longest = 0;
        for (int t = 0; t < n; t++) longest = positions[t] + 1 > longest ? positions[t] + 1 : longest;
        float *scores = aligned_alloc(32, sizeof(float) * (size_t)((longest + 7) / 8 * 8));
        if (!scores) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int task = 0; task < n * n_heads; task++) {
            if (!scores) continue;
            const int t = task / n_heads, head = task % n_heads;
            const long length = positions[t] + 1, padded = (length + 7) / 8 * 8;
            const float *query = q + (long)task * head_dim;
            const float *keys = cache.k + cache_offset(&cache, slots[t], head / group, 0);
            const float *values = cache.v + cache_offset(&cache, slots[t], head / group, 0);
            /* Scores and their maximum. */
            float highest = -INFINITY;
            for (long p = 0; p < length; p++) {
                const float *key = keys + p * position_stride;
                __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(query), _mm256_loadu_ps(key));
                for (int i = 8; i < head_dim; i += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(query + i), _mm256_loadu_ps(key + i), dot);
                scores[p] = horizontal_sum(dot);
                highest = scores[p] > highest ? scores[p] : highest;
            }
            /* exp(score - max) and their sum; the padding's terms are zeroed before they count. */
            for (long p = length; p < padded; p++) scores[p] = -INFINITY;
            __m256 total = _mm256_setzero_ps(), top = _mm256_set1_ps(highest);
            for (long p = 0; p < padded; p += 8) {
                __m256 e = exp256(_mm256_sub_ps(_mm256_load_ps(scores + p), top));
                if (p + 8 > length) e = _mm256_and_ps(e, _mm256_cmp_ps(_mm256_load_ps(scores + p), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
                _mm256_store_ps(scores + p, e);
                total = _mm256_add_ps(total, e);
            }
            const float inverse = 1.0f / horizontal_sum(total);
            /* The weighted sum of the values, head_dim / 8 vectors at a time (up to 64 floats). */
            float *result = out + (long)task * head_dim;
            for (int i = 0; i < head_dim; i += 64) {
                const int width = head_dim - i < 64 ? head_dim - i : 64;
                __m256 acc[8];
                for (int j = 0; j < width / 8; j++) acc[j] = _mm256_setzero_ps();
                for (long p = 0; p < length; p++) {
                    const __m256 weight = _mm256_set1_ps(scores[p]);
                    const float *value = values + p * position_stride + i;
                    for (int j = 0; j < width / 8; j++) acc[j] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * j), acc[j]);
                }
                for (int j = 0; j < width / 8; j++) _mm256_storeu_ps(result + i + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inverse)));
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* The residual stream's update and the next norm: sum = x + delta, normed = sum * (1 / sqrt(
 * mean(sum^2) + eps)) * weight; [n, width], width % 8 == 0. */
void add_rms_norm(const float *x, const float *delta, const float *weight, float eps, float *sum, float *normed, int n,
                  int width, int threads) {
    #pragma omp parallel for num_threads(threads) if (n >= 64)
    for (int t = 0; t < n; t++) {
        const long row = (long)t * width;
        __m256 squares = _mm256_setzero_ps();
        for (int i = 0; i < width; i += 8) {
            __m256 s = _mm256_add_ps(_mm256_loadu_ps(x + row + i), _mm256_loadu_ps(delta + row + i));
            _mm256_storeu_ps(sum + row + i, s);
            squares = _mm256_fmadd_ps(s, s, squares);
        }
        __m256 scale = _mm256_set1_ps(1.0f / sqrtf(horizontal_sum(squares) / (float)width + eps));
        for (int i = 0; i < width; i += 8)
            _mm256_storeu_ps(normed + row + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(sum + row + i), scale), _mm256_loadu_ps(weight + i)));
    }
}

/* gate_up [n, 2 * width] (gate, then up) -> out [n, width] = silu(gate) * up, width % 8 == 0. */
void silu_and_mul(const float *gate_up, float *out, int n, int width, int threads) {
    #pragma omp parallel for num_threads(threads) if (n >= 16)
    for (int t = 0; t < n; t++) {
        const float *gate = gate_up + (long)t * 2 * width, *up = gate + width;
        for (int i = 0; i < width; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(out + (long)t * width + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
        }
    }
}

/* ---- A whole decode step's layers in one call ----
 * Between the kernels above, Python and torch cost ~4 ms of a ~13 ms one-row step (a hundred-odd
 * calls a step, each also waking torch's OpenMP worker after the Python in between). For steps of
 * decode rows only, with int4 layers, `decode_layers` runs every layer here: the same kernels in
 * the same order on the same numbers, so a row's results are bit for bit those of the layer loop
 * in `forward._layers` (a test holds it to that), which keeps serving steps with prompt chunks. */

int int4_matmul(const uint8_t *packed, const uint16_t *scales, const uint16_t *minimums, const float *bias,
                const float *x, float *out, int rows, int in_features, int out_features, int threads);

/* One Int4Linear's buffers (cpu_int4.pack's layout). */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales, *minimums;
    const float *bias;
    int in_features, out_features;
} int4_linear_t;

typedef struct {
    int4_linear_t qkv, o, gate_up, down;
    const float *post_attention_norm, *next_norm; /* next_norm: the next layer's input norm, or the final one */
} decode_layer_t;

static int linear(const int4_linear_t *w, const float *x, float *out, int n, int threads) {
    return int4_matmul(w->codes, w->scales, w->minimums, w->bias, x, out, n, w->in_features, w->out_features, threads);
}

/* n decode tokens through n_layers layers: x [n, hidden] the residual stream, h [n, hidden] the
 * first layer's normed input, both updated in place (h ends as the final norm's output). Layer
 * i's cache: k at kv + i * layer_stride, v at k + v_offset, with the row / head / position
 * strides. Returns 0, or -1 when out of memory. */
int decode_layers(const decode_layer_t *layers, int n_layers, float *x, float *h, const float *rope,
                  const int64_t *positions, const int64_t *slots, float *kv, long layer_stride, long v_offset,
                  long row_stride, long head_stride, long position_stride, int n, int hidden, int n_heads,
                  int n_kv_heads, int head_dim, int intermediate, float eps, int threads) {
    const int qkv_width = (n_heads + 2 * n_kv_heads) * head_dim, q_width = n_heads * head_dim;
    float *qkv = malloc(sizeof(float) * n * qkv_width), *q = malloc(sizeof(float) * n * q_width);
    float *attended = malloc(sizeof(float) * n * q_width), *delta = malloc(sizeof(float) * n * hidden);
    float *gate_up = malloc(sizeof(float) * n * 2 * intermediate), *gated = malloc(sizeof(float) * n * intermediate);
    int status = qkv && q && attended && delta && gate_up && gated ? 0 : -1;
    for (int i = 0; i < n_layers && status == 0; i++) {
        const decode_layer_t *layer = layers + i;
        float *k = kv + i * layer_stride, *v = k + v_offset;
        status |= linear(&layer->qkv, h, qkv, n, threads);
        rope_and_cache_write(qkv, qkv_width, rope, positions, slots, q, k, v, row_stride, head_stride, position_stride,
                             n, n_heads, n_kv_heads, head_dim, threads);
        status |= decode_attention(q, k, v, row_stride, head_stride, position_stride, slots, positions, attended, n,
                                   n_heads, n_kv_heads, head_dim, threads);
        status |= linear(&layer->o, attended, delta, n, threads);
        add_rms_norm(x, delta, layer->post_attention_norm, eps, x, h, n, hidden, threads);
        status |= linear(&layer->gate_up, h, gate_up, n, threads);
        silu_and_mul(gate_up, gated, n, intermediate, threads);
        status |= linear(&layer->down, gated, delta, n, threads);
        add_rms_norm(x, delta, layer->next_norm, eps, x, h, n, hidden, threads);
    }
    free(qkv);
    free(q);
    free(attended);
    free(delta);
    free(gate_up);
    free(gated);
    return status ? -1 : 0;
}
