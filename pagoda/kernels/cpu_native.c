/* Pagoda's CPU kernels in C, built by pagoda/kernels/cpu_native.py on first use.
   Decode attention: keys and values of one position of one KV head lie D values apart from the
   next head's; the pool is [2, num_blocks, block_size, num_kv_heads, D], its values `half` values
   after its keys, in float32, bfloat16 or float16 (--kv-cache-dtype), read into float32 sums. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

/* bfloat16 as torch converts it: the float's top half, rounded to nearest even; NaN kept a NaN. */
static inline float bf16_load(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}
static inline uint16_t bf16_store(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if (isnan(x)) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* A decode row's two loops over a cached position's head_dim values: q . key, and out += p value. */
#define ROW_OPS(NAME, T, LOAD)                                                                                    \
static inline __attribute__((always_inline)) float NAME##_dot(const float* q, const T* key, int n) {             \
    float s = 0.f;                                                                                                \
    _Pragma("omp simd reduction(+:s)")                                                                            \
    for (int d = 0; d < n; d++) s += q[d] * LOAD(key[d]);                                                         \
    return s;                                                                                                     \
}                                                                                                                 \
static inline __attribute__((always_inline)) void NAME##_axpy(float* out, float p, const T* value, int n) {      \
    _Pragma("omp simd")                                                                                           \
    for (int d = 0; d < n; d++) out[d] += p * LOAD(value[d]);                                                     \
}
ROW_OPS(f32, float, f32_load)
ROW_OPS(bf16, uint16_t, bf16_load)

#ifdef __FLT16_MAX__ /* a compiler with _Float16 (GCC 12, clang 15); without it float16 pools attend in torch ops */
static inline _Float16 f16_store(float x) { return (_Float16)x; }
#if defined(__AVX__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
/* GCC converts _Float16 one value at a time (vcvtph2ps on one lane) and will not vectorize the
   loops: eight at a time through F16C's conversion here, as fast as the float32 pool's loops. */
static inline __attribute__((always_inline)) float f16_dot(const float* q, const _Float16* key, int n) {
    __m256 acc = _mm256_setzero_ps();
    int d = 0;
    for (; d + 8 <= n; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(key + d))), acc);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    float s = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
    for (; d < n; d++) s += q[d] * (float)key[d];
    return s;
}
static inline __attribute__((always_inline)) void f16_axpy(float* out, float p, const _Float16* value, int n) {
    __m256 pv = _mm256_set1_ps(p);
    int d = 0;
    for (; d + 8 <= n; d += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(value + d)));
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pv, v, _mm256_loadu_ps(out + d)));
    }
    for (; d < n; d++) out[d] += p * (float)value[d];
}
#else
static inline float f16_load(_Float16 x) { return (float)x; }
ROW_OPS(f16, _Float16, f16_load)
#endif
#endif

/* e^x where libm's expf would not vectorize: 2^n e^r, r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in
   two parts, so that n ln 2 is exact), e^r by its Taylor polynomial to r^7 (its error below
   float32's rounding), x clamped to [-87, 88] (2^n then a normal float). n is rounded to nearest
   by adding and taking away 1.5 * 2^23. */
static inline float exp_poly(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    float n = (x * 1.44269504f + 12582912.f) - 12582912.f;
    float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.f / 5040;
    p = p * r + 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* The step's keys and values (float32) into their slots, then one decode row's group of query
   heads that share KV head h: scores, softmax, weighted values. Rows of q, k and v lie q_stride
   and kv_stride values apart (views of the qkv projection's output), their heads packed. Positions
   are walked block by block: a division per position cost more than its dot products. */
#define DECODE_ATTENTION(NAME, T, OPS, STORE)                                                                    \
static void NAME##_write(const float* k, const float* v, int64_t kv_stride, T* pool, int64_t half,               \
                         const int64_t* slots, int rows, int64_t row_len) {                                       \
    for (int b = 0; b < rows; b++) {                                                                              \
        T* key = pool + slots[b] * row_len;                                                                       \
        T* value = pool + half + slots[b] * row_len;                                                              \
        for (int64_t i = 0; i < row_len; i++) {                                                                   \
            key[i] = STORE(k[b * kv_stride + i]);                                                                 \
            value[i] = STORE(v[b * kv_stride + i]);                                                               \
        }                                                                                                         \
    }                                                                                                             \
}                                                                                                                 \
                                                                                                                  \
static inline __attribute__((always_inline)) void NAME##_attend(                                                  \
    const float* q, const T* pool, int64_t half, const int32_t* table, int seq_len, int group, int64_t row_len,   \
    int head_dim, int block_size, int h, float scale, float* scores, float* out) {                                \
    for (int pos = 0, blk = 0; pos < seq_len; blk++) {                                                            \
        const T* key = pool + (int64_t)table[blk] * block_size * row_len + (int64_t)h * head_dim;                 \
        for (int end = pos + block_size < seq_len ? pos + block_size : seq_len; pos < end; pos++, key += row_len) { \
            for (int j = 0; j < group; j++)                                                                       \
                scores[(int64_t)j * seq_len + pos] = OPS##_dot(q + (int64_t)j * head_dim, key, head_dim) * scale;  \
        }                                                                                                         \
    }                                                                                                             \
    for (int j = 0; j < group; j++) {                                                                             \
        float* sj = scores + (int64_t)j * seq_len;                                                                \
        float m = -INFINITY, total = 0.f;                                                                         \
        for (int pos = 0; pos < seq_len; pos++) m = sj[pos] > m ? sj[pos] : m;                                    \
        for (int pos = 0; pos < seq_len; pos++) sj[pos] = exp_poly(sj[pos] - m);                                  \
        for (int pos = 0; pos < seq_len; pos++) total += sj[pos];                                                 \
        for (int pos = 0; pos < seq_len; pos++) sj[pos] /= total;                                                 \
        memset(out + (int64_t)j * head_dim, 0, head_dim * sizeof(float));                                         \
    }                                                                                                             \
    for (int pos = 0, blk = 0; pos < seq_len; blk++) {                                                            \
        const T* value = pool + half + (int64_t)table[blk] * block_size * row_len + (int64_t)h * head_dim;        \
        for (int end = pos + block_size < seq_len ? pos + block_size : seq_len; pos < end; pos++, value += row_len) { \
            for (int j = 0; j < group; j++)                                                                       \
                OPS##_axpy(out + (int64_t)j * head_dim, scores[(int64_t)j * seq_len + pos], value, head_dim);     \
        }                                                                                                         \
    }                                                                                                             \
}                                                                                                                 \
                                                                                                                  \
int NAME(const float* q, int64_t q_stride, const float* k, const float* v, int64_t kv_stride, void* pool_data,    \
         int64_t half, const int64_t* slots, const int32_t* tables, int64_t table_stride, const int32_t* seq_lens, \
         int rows, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale, float* out) {      \
    T* pool = pool_data;                                                                                          \
    int64_t row_len = (int64_t)num_kv_heads * head_dim;                                                           \
    NAME##_write(k, v, kv_stride, pool, half, slots, rows, row_len);                                              \
    int group = num_heads / num_kv_heads, failed = 0;                                                             \
    int64_t work = 0;                                                                                             \
    for (int b = 0; b < rows; b++) work += seq_lens[b];                                                           \
    _Pragma("omp parallel for collapse(2) schedule(dynamic) if (work * num_kv_heads > 512) reduction(|: failed)") \
    for (int b = 0; b < rows; b++) {                                                                              \
        for (int h = 0; h < num_kv_heads; h++) {                                                                  \
            float* scores = malloc(sizeof(float) * group * seq_lens[b]);                                          \
            if (!scores) { failed = 1; continue; }                                                                \
            int64_t first = (int64_t)b * num_heads + (int64_t)h * group;                                          \
            const float* qh = q + b * q_stride + (int64_t)h * group * head_dim;                                   \
            const int32_t* table = tables + b * table_stride;                                                     \
            float* oh = out + first * head_dim;                                                                   \
            /* The common head sizes as constants: their loops compile to straight vector code. */               \
            if (head_dim == 64)                                                                                   \
                NAME##_attend(qh, pool, half, table, seq_lens[b], group, row_len, 64, block_size, h, scale, scores, oh); \
            else if (head_dim == 128)                                                                             \
                NAME##_attend(qh, pool, half, table, seq_lens[b], group, row_len, 128, block_size, h, scale, scores, oh); \
            else                                                                                                  \
                NAME##_attend(qh, pool, half, table, seq_lens[b], group, row_len, head_dim, block_size, h, scale, scores, oh); \
            free(scores);                                                                                         \
        }                                                                                                         \
    }                                                                                                             \
    return failed;                                                                                                \
}

/* Any pool type's decode attention (they differ in the pool's values only), as decode_layer calls it. */
typedef int (*decode_attention_fn)(const float*, int64_t, const float*, const float*, int64_t, void*, int64_t,
                                   const int64_t*, const int32_t*, int64_t, const int32_t*, int, int, int, int, int,
                                   float, float*);

DECODE_ATTENTION(decode_attention, float, f32, f32_store)
DECODE_ATTENTION(decode_attention_bf16, uint16_t, bf16, bf16_store)
#ifdef __FLT16_MAX__
DECODE_ATTENTION(decode_attention_f16, _Float16, f16, f16_store)
#endif

/* RMSNorm of float32 rows [rows, hidden]: out = row / sqrt(mean(row^2) + eps) * weight. With
   `residual`, the row is x + residual, written into residual first (the decoder layers' add before
   their norms, as the CUDA kernel does it). 16 partial sums a row, so that the compiler vectorizes
   the sum of squares without reordering a float sum it was not asked to. */
void rms_norm(const float* x, float* residual, const float* weight, int rows, int hidden, float eps, float* out) {
    #pragma omp parallel for schedule(static) if ((int64_t)rows * hidden > 65536)
    for (int r = 0; r < rows; r++) {
        const float* row = x + (int64_t)r * hidden;
        if (residual) {
            float* sum = residual + (int64_t)r * hidden;
            for (int i = 0; i < hidden; i++) sum[i] += row[i];
            row = sum;
        }
        float partial[16] = {0};
        int i = 0;
        for (; i + 16 <= hidden; i += 16)
            for (int j = 0; j < 16; j++) partial[j] += row[i + j] * row[i + j];
        float squares = 0;
        for (; i < hidden; i++) squares += row[i] * row[i];
        for (int j = 0; j < 16; j++) squares += partial[j];
        float inverse = 1.0f / sqrtf(squares / hidden + eps);
        float* o = out + (int64_t)r * hidden;
        for (i = 0; i < hidden; i++) o[i] = row[i] * inverse * weight[i];
    }
}

/* Rotate-half rotary embedding in place, float32: each token t's query heads (q + t * q_stride, head
   after head) and key heads rotated by row positions[t] of cos_sin [*, rotary_dim] (its cosines,
   then its sines); the first rotary_dim values of each head rotate, the rest pass. Rounded as the
   torch path rounds: x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product rounded. */
static void rotate_heads(float* x, int heads, int head_dim, const float* cos, int half) {
    for (int h = 0; h < heads; h++) {
        float* x1 = x + (int64_t)h * head_dim;
        float* x2 = x1 + half;
        for (int i = 0; i < half; i++) {
            float a = x1[i], b = x2[i], c = cos[i], s = cos[half + i];
            x1[i] = a * c - b * s;
            x2[i] = b * c + a * s;
        }
    }
}

void rotary(const int64_t* positions, int tokens, float* q, int64_t q_stride, int q_heads, float* k,
            int64_t k_stride, int k_heads, int head_dim, const float* cos_sin, int rotary_dim) {
    int half = rotary_dim / 2;
    #pragma omp parallel for schedule(static) if (tokens >= 64)
    for (int t = 0; t < tokens; t++) {
        const float* cos = cos_sin + positions[t] * rotary_dim;
        rotate_heads(q + t * q_stride, q_heads, head_dim, cos, half);
        rotate_heads(k + t * k_stride, k_heads, head_dim, cos, half);
    }
}

/* silu(gate) * up for rows [gate | up] of 2n values (float32), as torch computes it:
   gate / (1 + e^-gate) * up. */
void silu_and_mul(const float* x, int rows, int n, float* out) {
    for (int r = 0; r < rows; r++) {
        const float* gate = x + (int64_t)r * 2 * n;
        const float* up = gate + n;
        float* o = out + (int64_t)r * n;
        for (int i = 0; i < n; i++) o[i] = gate[i] / (1.f + exp_poly(-gate[i])) * up[i];
    }
}

/* int4 weights x integer activations, for the 4-bit weight-only layers (pagoda/quantization/int4pack.py):
   W = d * q + m with q in 0..15 and a float16 d and m for each output and 32 inputs. Each row of x is
   quantized per 32 inputs (scale a = max|x| / levels), and 16 outputs at a time are summed
   exactly in integers, then scaled: per block, y += d * a * sum(q * xq) + m * sum(x).
   - AVX512-VNNI: int16 activations (2**-15 of the block's largest value, finer than bfloat16's
     2**-9), summed by vpdpwssd (32 products an instruction, twice float32's FMA).
   - AVX2: int8 activations (2**-7 of the block's largest, as llama.cpp's own CPU matmuls take
     them: ~1 % of a product's size, so greedy tokens may part from float32's after a near-tie),
     summed by vpmaddubsw: 32 products an instruction, where int16's vpmaddwd takes 16 and the
     multiplies are what bound a decode step of many rows (~1.6x over int16 at 16 rows). Unless
     the process asks for int16 (set_int4_activation_levels), summed as VNNI's by vpmaddwd.
   The weight is [N/16][K/32] blocks of INT4_BLOCK bytes: 8 chunks of 32 bytes, each two steps of
   2 inputs x 16 outputs (byte 2o + i: output o, input i; the even step in the low nibbles), then
   the 16 outputs' d, then their m (float16). */
#define INT4_BLOCK 320
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define INT_MATMULS 1
#define ROW_TILE 8 /* rows whose int32 and float32 sums stay in the 32 vector registers */
#include <immintrin.h>

/* Row r's 32-input blocks as int16 pairs (read as int32 by the broadcasts), their scales and float sums. */
static void quantize_rows(const float* x, int rows, int k, int16_t* q, float* scales, float* sums) {
    int groups = k / 32;
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            const float* a = x + (int64_t)r * k + g * 32;
            __m512 lo = _mm512_loadu_ps(a), hi = _mm512_loadu_ps(a + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
            __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
            int16_t* out = q + (int64_t)r * k + g * 32;
            _mm256_storeu_si256((__m256i*)out, _mm512_cvtsepi32_epi16(qlo));
            _mm256_storeu_si256((__m256i*)(out + 16), _mm512_cvtsepi32_epi16(qhi));
            scales[(int64_t)r * groups + g] = amax / 32767.f;
            sums[(int64_t)r * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
    }
}

/* R rows (R a constant once inlined: its accumulators stay in registers) x the 16 outputs of block row `w`. */
static inline __attribute__((always_inline)) void int4_rows(
    const int R, const uint8_t* w, int groups, const int16_t* q, int k, const float* scales, const float* sums_x,
    float* out, int64_t n) {
    const __m512i nibble = _mm512_set1_epi16(0x0F);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++, w += INT4_BLOCK) {
        /* Each row's int32 sums; two for a lone row (two chains of vpdpwssd, not one twice as long). */
        __m512i sums[8][2];
        /* Four blocks ahead: ~10 % at one row and ~20 % at 16 with the weights in memory, not in cache. */
        for (int line = 0; line < INT4_BLOCK; line += 64) _mm_prefetch((const char*)(w + 4 * INT4_BLOCK + line), _MM_HINT_T0);
        for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c++) {
            __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + 32 * c)));
            __m512i low = _mm512_and_si512(bytes, nibble), high = _mm512_srli_epi16(bytes, 4);
            for (int r = 0; r < R; r++) {
                const int32_t* pairs = (const int32_t*)(q + (int64_t)r * k + g * 32) + 2 * c;
                sums[r][0] = _mm512_dpwssd_epi32(sums[r][0], low, _mm512_set1_epi32(pairs[0]));
                sums[r][R == 1] = _mm512_dpwssd_epi32(sums[r][R == 1], high, _mm512_set1_epi32(pairs[1]));
            }
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + 256)));
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + 288)));
        for (int r = 0; r < R; r++) {
            __m512i total = R == 1 ? _mm512_add_epi32(sums[r][0], sums[r][1]) : sums[r][0];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, _mm512_set1_ps(scales[(int64_t)r * groups + g])), acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums_x[(int64_t)r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (int64_t)r * n, acc[r]);
}

/* out [rows, n] ~ x [rows, k] @ W^T for W = values * scales per 32 (GGUF's Q8_0 rows, as
   pagoda/layers/q8_rows.py holds them: blocks of 16 rows [n/16][k/32][16 pairs][16 rows][2] int8,
   scales [n/16][k/32][16 rows] float32, n padded to 16), each row of x in int16 steps of its
   max|x| / 32767: within max|x| * 2**-15 * sum|W_row| of the exact product (the LM head's screen,
   pagoda/layers/lm_head_screen.py, recomputes the candidates exactly). As the int4 matmul: 16
   outputs at a time, summed in int32, one scale a block of 32 inputs. */
static inline __attribute__((always_inline)) void q8_rows(
    const int R, const int8_t* w, const float* wscales, int groups, const int16_t* q, int k, const float* steps,
    float* out, int64_t n, int columns) {
    __mmask16 mask = (__mmask16)((1u << columns) - 1);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++, w += 512) {
        __m512i sums[8][2];
        /* Four blocks ahead, as the int4 matmul: 2.5 -> 1.7 ms for the default model's head at one row (AVX2). */
        for (int line = 0; line < 512; line += 64) _mm_prefetch((const char*)(w + 4 * 512 + line), _MM_HINT_T0);
        for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm512_setzero_si512();
        for (int pair = 0; pair < 16; pair++) {
            __m512i values = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + 32 * pair)));
            for (int r = 0; r < R; r++) {
                const int32_t* pairs = (const int32_t*)(q + (int64_t)r * k + 32 * g);
                sums[r][R == 1 && (pair & 1)] =
                    _mm512_dpwssd_epi32(sums[r][R == 1 && (pair & 1)], values, _mm512_set1_epi32(pairs[pair]));
            }
        }
        __m512 scale = _mm512_loadu_ps(wscales + 16 * g);
        for (int r = 0; r < R; r++) {
            __m512i total = R == 1 ? _mm512_add_epi32(sums[r][0], sums[r][1]) : sums[r][0];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), scale, acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        _mm512_mask_storeu_ps(out + (int64_t)r * n, mask, _mm512_mul_ps(acc[r], _mm512_set1_ps(steps[r])));
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define INT_MATMULS 1
#define ROW_TILE 4 /* 16 vector registers: 4 rows' integer and float32 sums fill them */
#define INT8_ACTIVATIONS 1
#include <immintrin.h>

static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 16 int32 (two vectors of 8 in order) as 16 int16, saturated, stored at out. */
static inline void store_int16(int16_t* out, __m256i a, __m256i b) {
    /* packs works within 128-bit lanes: a0-3 b0-3 a4-7 b4-7, put back in order. */
    _mm256_storeu_si256((__m256i*)out, _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
}

/* A block of 32 inputs at a as integer steps of its largest size / levels, into q[4] (int32, in
   order); its step, and its float sum in *sum. */
static inline float quantize_block(const float* a, float levels, __m256i q[4], float* sum) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(a + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        total = _mm256_add_ps(total, v[i]);
    }
    float largest = max8(amax);
    __m256 inv = _mm256_set1_ps(largest > 0.f ? levels / largest : 0.f);
    for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    *sum = sum8(total);
    return largest / levels;
}

/* As the AVX-512 quantize_rows: int16 pairs, scales and float sums of each row's 32-input blocks. */
static void quantize_rows(const float* x, int rows, int k, int16_t* q, float* scales, float* sums) {
    int groups = k / 32;
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            __m256i qv[4];
            int64_t at = (int64_t)r * groups + g;
            scales[at] = quantize_block(x + (int64_t)r * k + g * 32, 32767.f, qv, &sums[at]);
            int16_t* out = q + (int64_t)r * k + g * 32;
            store_int16(out, qv[0], qv[1]);
            store_int16(out + 16, qv[2], qv[3]);
        }
    }
}

/* As the AVX-512 int4_rows, each 16 outputs in two halves of 8 (bytes 0-15 and 16-31 of a chunk). */
static inline __attribute__((always_inline)) void int4_rows(
    const int R, const uint8_t* w, int groups, const int16_t* q, int k, const float* scales, const float* sums_x,
    float* out, int64_t n) {
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    __m256 acc[ROW_TILE][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++, w += INT4_BLOCK) {
        __m256i sums[ROW_TILE][2];
        for (int line = 0; line < INT4_BLOCK; line += 64)
            _mm_prefetch((const char*)(w + 4 * INT4_BLOCK + line), _MM_HINT_T0);
        for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            for (int h = 0; h < 2; h++) {
                __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(w + 32 * c + 16 * h)));
                __m256i low = _mm256_and_si256(bytes, nibble), high = _mm256_srli_epi16(bytes, 4);
                for (int r = 0; r < R; r++) {
                    const int32_t* pairs = (const int32_t*)(q + (int64_t)r * k + g * 32) + 2 * c;
                    __m256i both = _mm256_add_epi32(_mm256_madd_epi16(low, _mm256_set1_epi32(pairs[0])),
                                                    _mm256_madd_epi16(high, _mm256_set1_epi32(pairs[1])));
                    sums[r][h] = _mm256_add_epi32(sums[r][h], both);
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 256 + 16 * h)));
            __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 288 + 16 * h)));
            for (int r = 0; r < R; r++) {
                __m256 scaled = _mm256_mul_ps(d, _mm256_set1_ps(scales[(int64_t)r * groups + g]));
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), scaled, acc[r][h]);
                acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(sums_x[(int64_t)r * groups + g]), acc[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + (int64_t)r * n, acc[r][0]);
        _mm256_storeu_ps(out + (int64_t)r * n + 8, acc[r][1]);
    }
}

/* Row r's 32-input blocks in int8 steps (at most 127 in size: vpmaddubsw's pairs of products stay
   within int16), their scales and float sums. */
static void quantize_rows_int8(const float* x, int rows, int k, int8_t* q, float* scales, float* sums) {
    /* packs works within 128-bit lanes: their 4-byte groups come out as 0 2 4 6 1 3 5 7 */
    const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int groups = k / 32;
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < groups; g++) {
            __m256i qv[4];
            int64_t at = (int64_t)r * groups + g;
            scales[at] = quantize_block(x + (int64_t)r * k + g * 32, 127.f, qv, &sums[at]);
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qv[0], qv[1]), _mm256_packs_epi32(qv[2], qv[3]));
            _mm256_storeu_si256((__m256i*)(q + (int64_t)r * k + g * 32), _mm256_permutevar8x32_epi32(bytes, in_order));
        }
    }
}

/* As the AVX-512 int4_rows, with int8 activations: vpmaddubsw multiplies a chunk's 32 nibbles (16
   outputs x 2 inputs) by an input pair, into 16 int16 sums. A sum of 8 such steps (16 products of at
   most 15 x 127) fits int16, so each half block of 4 chunks is summed in int16 and widened to int32
   as even and odd outputs; unpacked, those come out as outputs [0-3 | 8-11] and [4-7 | 12-15],
   the order d, m and the float sums are kept in (in-lane shuffles only: Zen 1 splits the others). */
static inline __attribute__((always_inline)) void int4_rows_int8(
    const int R, const uint8_t* w, int groups, const int8_t* q, int k, const float* scales, const float* sums_x,
    float* out, int64_t n) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256 acc[ROW_TILE][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++, w += INT4_BLOCK) {
        for (int line = 0; line < INT4_BLOCK; line += 64)
            _mm_prefetch((const char*)(w + 4 * INT4_BLOCK + line), _MM_HINT_T0);
        __m128i dlo = _mm_loadu_si128((const __m128i*)(w + 256)), dhi = _mm_loadu_si128((const __m128i*)(w + 272));
        __m128i mlo = _mm_loadu_si128((const __m128i*)(w + 288)), mhi = _mm_loadu_si128((const __m128i*)(w + 304));
        __m256 d[2] = {_mm256_cvtph_ps(_mm_unpacklo_epi64(dlo, dhi)), _mm256_cvtph_ps(_mm_unpackhi_epi64(dlo, dhi))};
        __m256 m[2] = {_mm256_cvtph_ps(_mm_unpacklo_epi64(mlo, mhi)), _mm256_cvtph_ps(_mm_unpackhi_epi64(mlo, mhi))};
        __m256i even[ROW_TILE], odd[ROW_TILE];
        _Pragma("GCC unroll 2")  /* unrolled: 1.1x at 16 rows */
        for (int half = 0; half < 2; half++) {
            __m256i sums[ROW_TILE];
            for (int r = 0; r < R; r++) sums[r] = _mm256_setzero_si256();
            _Pragma("GCC unroll 4")
            for (int c = 4 * half; c < 4 * half + 4; c++) {
                __m256i bytes = _mm256_loadu_si256((const __m256i*)(w + 32 * c));
                __m256i low = _mm256_and_si256(bytes, nibble);
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
                for (int r = 0; r < R; r++) {
                    const int16_t* pairs = (const int16_t*)(q + (int64_t)r * k + g * 32) + 2 * c;
                    sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(low, _mm256_set1_epi16(pairs[0])));
                    sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(high, _mm256_set1_epi16(pairs[1])));
                }
            }
            for (int r = 0; r < R; r++) {
                __m256i e = _mm256_srai_epi32(_mm256_slli_epi32(sums[r], 16), 16), o = _mm256_srai_epi32(sums[r], 16);
                even[r] = half ? _mm256_add_epi32(even[r], e) : e;
                odd[r] = half ? _mm256_add_epi32(odd[r], o) : o;
            }
        }
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_set1_ps(scales[(int64_t)r * groups + g]);
            __m256 sx = _mm256_set1_ps(sums_x[(int64_t)r * groups + g]);
            __m256i first = _mm256_unpacklo_epi32(even[r], odd[r]), second = _mm256_unpackhi_epi32(even[r], odd[r]);
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_mul_ps(d[0], a), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_mul_ps(d[1], a), acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(m[0], sx, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(m[1], sx, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        float* o = out + (int64_t)r * n;
        _mm_storeu_ps(o, _mm256_castps256_ps128(acc[r][0]));
        _mm_storeu_ps(o + 4, _mm256_castps256_ps128(acc[r][1]));
        _mm_storeu_ps(o + 8, _mm256_extractf128_ps(acc[r][0], 1));
        _mm_storeu_ps(o + 12, _mm256_extractf128_ps(acc[r][1], 1));
    }
}

/* As the AVX-512 q8_rows: the first `columns` of 16 outputs, in two halves of 8. */
static inline __attribute__((always_inline)) void q8_rows(
    const int R, const int8_t* w, const float* wscales, int groups, const int16_t* q, int k, const float* steps,
    float* out, int64_t n, int columns) {
    __m256 acc[ROW_TILE][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++, w += 512) {
        __m256i sums[ROW_TILE][2];
        for (int line = 0; line < 512; line += 64) _mm_prefetch((const char*)(w + 4 * 512 + line), _MM_HINT_T0);
        for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
        for (int pair = 0; pair < 16; pair++) {
            for (int h = 0; h < 2; h++) {
                __m256i values = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + 32 * pair + 16 * h)));
                for (int r = 0; r < R; r++) {
                    const int32_t* pairs = (const int32_t*)(q + (int64_t)r * k + 32 * g);
                    __m256i products = _mm256_madd_epi16(values, _mm256_set1_epi32(pairs[pair]));
                    sums[r][h] = _mm256_add_epi32(sums[r][h], products);
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 scale = _mm256_loadu_ps(wscales + 16 * g + 8 * h);
            for (int r = 0; r < R; r++) acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), scale, acc[r][h]);
        }
    }
    for (int r = 0; r < R; r++) {
        float row[16];
        __m256 step = _mm256_set1_ps(steps[r]);
        _mm256_storeu_ps(row, _mm256_mul_ps(acc[r][0], step));
        _mm256_storeu_ps(row + 8, _mm256_mul_ps(acc[r][1], step));
        memcpy(out + (int64_t)r * n, row, sizeof(float) * columns);
    }
}
#endif

#ifdef INT_MATMULS
int int_matmuls_supported(void) { return 1; }

/* One block row of W (16 outputs) for all rows of x, in tiles of as many rows as the registers hold. */
static void int4_block(const uint8_t* w, int groups, int rows, const void* activations, int k, const float* scales,
                       const float* sums, float* out, int64_t n) {
    const int16_t* q = activations;
    int r = 0;
#if ROW_TILE == 8
    for (; r + 8 <= rows; r += 8)
        int4_rows(8, w, groups, q + (int64_t)r * k, k, scales + (int64_t)r * groups, sums + (int64_t)r * groups,
                  out + r * n, n);
#endif
    for (; r + 4 <= rows; r += 4)
        int4_rows(4, w, groups, q + (int64_t)r * k, k, scales + (int64_t)r * groups, sums + (int64_t)r * groups,
                  out + r * n, n);
    for (; r < rows; r++)
        int4_rows(1, w, groups, q + (int64_t)r * k, k, scales + (int64_t)r * groups, sums + (int64_t)r * groups,
                  out + r * n, n);
}

#ifdef INT8_ACTIVATIONS
static int int8_activations = 1;  /* by default where the CPU has them (AVX2) */

static void int4_block_int8(const uint8_t* w, int groups, int rows, const void* activations, int k,
                            const float* scales, const float* sums, float* out, int64_t n) {
    const int8_t* q = activations;
    int r = 0;
    for (; r + 4 <= rows; r += 4)
        int4_rows_int8(4, w, groups, q + (int64_t)r * k, k, scales + (int64_t)r * groups, sums + (int64_t)r * groups,
                       out + r * n, n);
    for (; r < rows; r++)
        int4_rows_int8(1, w, groups, q + (int64_t)r * k, k, scales + (int64_t)r * groups, sums + (int64_t)r * groups,
                       out + r * n, n);
}
#endif

/* The int4 matmul's activation steps, max|x| / levels: 127 (int8) or 32767 (int16), the process's
   setting (PAGODA_CPU_INT4_ACTIVATIONS, pagoda/kernels/cpu_native.py). Where the CPU has only the
   int16 kernel (AVX512-VNNI) they stay 32767 whatever is asked. */
void set_int4_activation_levels(int levels) {
#ifdef INT8_ACTIVATIONS
    int8_activations = levels == 127;
#else
    (void)levels;
#endif
}

int int4_activation_levels(void) {
#ifdef INT8_ACTIVATIONS
    if (int8_activations) return 127;
#endif
    return 32767;
}

/* out [rows, n] = x [rows, k] @ W^T for W packed as above (k a multiple of 32, n of 16); 1 without memory. */
int int4_matmul(const float* x, int rows, int k, const uint8_t* w, int64_t n, float* out) {
    if (rows == 0) return 0;  /* (aligned_alloc of nothing may give NULL) */
    int groups = k / 32;
    size_t activation_size = sizeof(int16_t);
    void (*block)(const uint8_t*, int, int, const void*, int, const float*, const float*, float*, int64_t) = int4_block;
#ifdef INT8_ACTIVATIONS
    if (int8_activations) {
        activation_size = sizeof(int8_t);
        block = int4_block_int8;
    }
#endif
    void* q = aligned_alloc(64, ((size_t)rows * k * activation_size + 63) / 64 * 64);
    float* scales = malloc(sizeof(float) * 2 * (size_t)rows * groups);
    if (!q || !scales) { free(q); free(scales); return 1; }
    float* sums = scales + (size_t)rows * groups;
#ifdef INT8_ACTIVATIONS
    if (int8_activations) quantize_rows_int8(x, rows, k, q, scales, sums);
    else
#endif
        quantize_rows(x, rows, k, q, scales, sums);
    int64_t blocks = n / 16;
    #pragma omp parallel for schedule(static) if (blocks * rows * groups > 256)
    for (int64_t b = 0; b < blocks; b++)
        block(w + b * groups * INT4_BLOCK, groups, rows, q, k, scales, sums, out + b * 16, n);
    free(q);
    free(scales);
    return 0;
}

/* Each row of out [rows, n] plus bias (none where NULL), as torch adds a linear layer's bias. */
static void add_bias(float* out, int rows, int64_t n, const float* bias) {
    if (!bias) return;
    for (int r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) out[r * n + i] += bias[i];
}

/* A Llama-style decoder layer as decode_layers reads it (pagoda/models/cpu_decode_layer.py builds
   these): its weights (the four matmuls' as int4_matmul takes them; biases, Qwen3's q/k norms
   NULL where absent), its shapes, and its KV pool with the decode attention of the pool's type. */
typedef struct {
    const float *input_norm, *post_norm;
    const uint8_t *w_qkv, *w_o, *w_gate_up, *w_down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;
    const float *q_norm, *k_norm, *cos_sin;
    decode_attention_fn attend;
    void* pool;
    int64_t half;  /* the pool's values lie this many values after its keys */
    int hidden, intermediate, rotary_dim, num_heads, num_kv_heads, head_dim, block_size;
    float eps, qk_eps, scale;
} decoder_layer;

/* One layer for a step of decode rows: at small batches a layer's ~40 torch ops and their
   dispatch cost more than its arithmetic. Float32 activations:
     s = x + residual (x alone in the first layer), written into residual;
     q, k, v = int4(rms_norm(s) * input_norm, w_qkv); each head of q and k normed by q_norm and
         k_norm where given (Qwen3); q and k rotated (rotary);
     a = attend(...): the decode attention of the pool's type (its keys and values written first);
     residual = int4(a, w_o) + s; out = int4(silu_and_mul(int4(rms_norm(residual) * post_norm, w_gate_up)), w_down).
   The same kernels the torch path calls one by one, in its order. Each stage runs only once those
   before it have (a matmul's or the attention's scratch may not be had): 1 without memory. */
static int decode_layer(
    const decoder_layer* L, const float* x, float* residual, int first, int rows, const int64_t* positions,
    const int64_t* slots, const int32_t* tables, int64_t table_stride, const int32_t* seq_lens, float* out) {
    int hidden = L->hidden;
    int64_t intermediate = L->intermediate;
    int64_t q_size = (int64_t)L->num_heads * L->head_dim, kv_size = (int64_t)L->num_kv_heads * L->head_dim;
    int64_t qkv_size = q_size + 2 * kv_size;
    int64_t per_row = hidden + qkv_size + q_size + 3 * intermediate + hidden;
    float* normed = malloc(sizeof(float) * per_row * rows);
    if (!normed) return 1;
    float* qkv = normed + (int64_t)rows * hidden;
    float* attended = qkv + rows * qkv_size;
    float* gate_up = attended + rows * q_size;
    float* act = gate_up + rows * 2 * intermediate;
    float* projected = act + rows * intermediate;
    rms_norm(x, first ? NULL : residual, L->input_norm, rows, hidden, L->eps, normed);
    if (first) memcpy(residual, x, sizeof(float) * rows * hidden);
    int failed = int4_matmul(normed, rows, hidden, L->w_qkv, qkv_size, qkv);
    if (!failed) {
        add_bias(qkv, rows, qkv_size, L->qkv_bias);
        float *q = qkv, *k = qkv + q_size, *v = k + kv_size;
        for (int r = 0; L->q_norm && r < rows; r++) {  /* in place: each head's sum of squares is read first */
            rms_norm(q + r * qkv_size, NULL, L->q_norm, L->num_heads, L->head_dim, L->qk_eps, q + r * qkv_size);
            rms_norm(k + r * qkv_size, NULL, L->k_norm, L->num_kv_heads, L->head_dim, L->qk_eps, k + r * qkv_size);
        }
        rotary(positions, rows, q, qkv_size, L->num_heads, k, qkv_size, L->num_kv_heads, L->head_dim, L->cos_sin,
               L->rotary_dim);
        failed = L->attend(q, qkv_size, k, v, qkv_size, L->pool, L->half, slots, tables, table_stride, seq_lens, rows,
                           L->num_heads, L->num_kv_heads, L->head_dim, L->block_size, L->scale, attended);
    }
    if (!failed)
        failed = int4_matmul(attended, rows, q_size, L->w_o, hidden, projected);
    if (!failed) {
        add_bias(projected, rows, hidden, L->o_bias);
        rms_norm(projected, residual, L->post_norm, rows, hidden, L->eps, normed);
        failed = int4_matmul(normed, rows, hidden, L->w_gate_up, 2 * intermediate, gate_up);
    }
    if (!failed) {
        add_bias(gate_up, rows, 2 * intermediate, L->gate_up_bias);
        silu_and_mul(gate_up, rows, intermediate, act);
        failed = int4_matmul(act, rows, intermediate, L->w_down, hidden, out);
    }
    if (!failed)
        add_bias(out, rows, hidden, L->down_bias);
    free(normed);
    return failed;
}

/* Successive decoder layers (of one hidden size) for a step of decode rows, in one call: a layer
   called from Python cost ~50 us of argument passing and glue at one stream. x is the first
   layer's input; residual the stream the layers add into (first: none yet, x is taken as it);
   out the last layer's output. 1 without memory. */
int decode_layers(
    const decoder_layer* layers, int num_layers, const float* x, float* residual, int first, int rows,
    const int64_t* positions, const int64_t* slots, const int32_t* tables, int64_t table_stride,
    const int32_t* seq_lens, float* out) {
    /* Layers write out and spare by turns, so that the last writes out and none reads what it writes. */
    float* spare = num_layers > 1 ? malloc(sizeof(float) * rows * layers[0].hidden) : NULL;
    if (num_layers > 1 && !spare) return 1;
    const float* in = x;
    int failed = 0;
    for (int i = 0; i < num_layers && !failed; i++) {
        float* written = (num_layers - 1 - i) % 2 == 0 ? out : spare;
        failed = decode_layer(&layers[i], in, residual, first && i == 0, rows, positions, slots, tables, table_stride,
                              seq_lens, written);
        in = written;
    }
    free(spare);
    return failed;
}

int q8_matmul(const float* x, int rows, int k, const int8_t* blocks, const float* scales, int64_t n, float* out) {
    if (rows == 0) return 0;
    int groups = k / 32;
    int16_t* q = malloc((size_t)rows * k * sizeof(int16_t));
    float* steps = malloc(sizeof(float) * (size_t)rows);
    if (!q || !steps) { free(q); free(steps); return 1; }
    for (int r = 0; r < rows; r++) {
        const float* a = x + (int64_t)r * k;
        float amax = 0.f;
        for (int i = 0; i < k; i++) amax = fabsf(a[i]) > amax ? fabsf(a[i]) : amax;
        float inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int i = 0; i < k; i++) q[(int64_t)r * k + i] = (int16_t)nearbyintf(a[i] * inv);
        steps[r] = amax / 32767.f;
    }
    int64_t num_blocks = (n + 15) / 16;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < num_blocks; b++) {
        const int8_t* w = blocks + b * groups * 512;
        const float* ws = scales + b * groups * 16;
        int columns = n - 16 * b >= 16 ? 16 : (int)(n - 16 * b);
        float* o = out + 16 * b;
        int r = 0;
#if ROW_TILE == 8
        for (; r + 8 <= rows; r += 8) q8_rows(8, w, ws, groups, q + (int64_t)r * k, k, steps + r, o + r * n, n, columns);
#endif
        for (; r + 4 <= rows; r += 4) q8_rows(4, w, ws, groups, q + (int64_t)r * k, k, steps + r, o + r * n, n, columns);
        for (; r < rows; r++) q8_rows(1, w, ws, groups, q + (int64_t)r * k, k, steps + r, o + r * n, n, columns);
    }
    free(q);
    free(steps);
    return 0;
}
#else
int int_matmuls_supported(void) { return 0; }
void set_int4_activation_levels(int levels) {}
int int4_activation_levels(void) { return 0; }
int decode_layers(void) { return 1; } /* never called: layers run in C only where int_matmuls_supported() */
int int4_matmul(const float* x, int rows, int k, const unsigned char* w, int64_t n, float* out) { return 1; }
int q8_matmul(const float* x, int rows, int k, const signed char* blocks, const float* scales, int64_t n, float* out) {
    return 1;
}
#endif

/* The LM head's screen (pagoda/layers/lm_head_screen.py), for W held as q8_matmul reads it: each
   row's logits [rows, n], each within bound[r] of x_r . W_n, get those that could be the row's
   maximum (within twice the bound of its largest) recomputed from x and W's float32 values, so
   that the row's argmax is that of x @ W^T. One pass over a row where torch's ops made six. */
void q8_exact_near_the_max(const float* x, int rows, int k, const int8_t* blocks, const float* scales, int64_t n,
                           const float* bound, float* logits) {
    int groups = k / 32;
    #pragma omp parallel for schedule(static) if (rows > 1)
    for (int r = 0; r < rows; r++) {
        float* row = logits + (int64_t)r * n;
        float largest = row[0];
        for (int64_t i = 1; i < n; i++) largest = row[i] > largest ? row[i] : largest;
        float floor = largest - 2 * bound[r];
        const float* xr = x + (int64_t)r * k;
        for (int64_t i = 0; i < n; i++) {
            if (!(row[i] >= floor)) continue;
            /* Row i of W: row i % 16 of its block of 16, its values in pairs of inputs (q8_rows.py). */
            const int8_t* block = blocks + (i / 16) * groups * 512 + (i % 16) * 2;
            const float* block_scales = scales + (i / 16) * groups * 16 + i % 16;
            float sum = 0.f;
            for (int g = 0; g < groups; g++)
                for (int j = 0; j < 32; j++)
                    sum += xr[g * 32 + j] * (block[g * 512 + (j / 2) * 32 + j % 2] * block_scales[g * 16]);
            row[i] = sum;
        }
    }
}
