/* Pagoda's CPU kernels in C, built by pagoda/kernels/cpu_native.py when the CPU backend is made.
   Keys and values of one position of one KV head lie D floats apart from the next head's; the pool
   is [2, num_blocks, block_size, num_kv_heads, D], its values `half` floats after its keys. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void write_kv(const float* k, const float* v, float* pool, int64_t half, const int64_t* slots,
                     int rows, int64_t row_len) {
    for (int b = 0; b < rows; b++) {
        memcpy(pool + slots[b] * row_len, k + b * row_len, row_len * sizeof(float));
        memcpy(pool + half + slots[b] * row_len, v + b * row_len, row_len * sizeof(float));
    }
}

/* One decode row's group of query heads that share KV head h: scores, softmax, weighted values.
   Positions are walked block by block: a division per position cost more than its dot products. */
static inline __attribute__((always_inline)) void attend(
    const float* q, const float* pool, int64_t half, const int32_t* table, int seq_len, int group, int64_t row_len,
    int head_dim, int block_size, int h, float scale, float* scores, float* out) {
    for (int pos = 0, blk = 0; pos < seq_len; blk++) {
        const float* key = pool + (int64_t)table[blk] * block_size * row_len + (int64_t)h * head_dim;
        for (int end = pos + block_size < seq_len ? pos + block_size : seq_len; pos < end; pos++, key += row_len) {
            for (int j = 0; j < group; j++) {
                const float* qj = q + (int64_t)j * head_dim;
                float s = 0.f;
                #pragma omp simd reduction(+:s)
                for (int d = 0; d < head_dim; d++) s += qj[d] * key[d];
                scores[(int64_t)j * seq_len + pos] = s * scale;
            }
        }
    }
    for (int j = 0; j < group; j++) {
        float* sj = scores + (int64_t)j * seq_len;
        float m = -INFINITY, total = 0.f;
        for (int pos = 0; pos < seq_len; pos++) m = sj[pos] > m ? sj[pos] : m;
        for (int pos = 0; pos < seq_len; pos++) { sj[pos] = expf(sj[pos] - m); total += sj[pos]; }
        for (int pos = 0; pos < seq_len; pos++) sj[pos] /= total;
        memset(out + (int64_t)j * head_dim, 0, head_dim * sizeof(float));
    }
    for (int pos = 0, blk = 0; pos < seq_len; blk++) {
        const float* value = pool + half + (int64_t)table[blk] * block_size * row_len + (int64_t)h * head_dim;
        for (int end = pos + block_size < seq_len ? pos + block_size : seq_len; pos < end; pos++, value += row_len) {
            for (int j = 0; j < group; j++) {
                float p = scores[(int64_t)j * seq_len + pos], *oj = out + (int64_t)j * head_dim;
                #pragma omp simd
                for (int d = 0; d < head_dim; d++) oj[d] += p * value[d];
            }
        }
    }
}

int decode_attention(const float* q, const float* k, const float* v, float* pool, int64_t half,
                     const int64_t* slots, const int32_t* tables, int64_t table_stride, const int32_t* seq_lens,
                     int rows, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                     float* out) {
    int64_t row_len = (int64_t)num_kv_heads * head_dim;
    write_kv(k, v, pool, half, slots, rows, row_len);
    int group = num_heads / num_kv_heads, failed = 0;
    int64_t work = 0;
    for (int b = 0; b < rows; b++) work += seq_lens[b];
    #pragma omp parallel for collapse(2) schedule(dynamic) if (work * num_kv_heads > 4096) reduction(|: failed)
    for (int b = 0; b < rows; b++) {
        for (int h = 0; h < num_kv_heads; h++) {
            float* scores = malloc(sizeof(float) * group * seq_lens[b]);
            if (!scores) { failed = 1; continue; }
            int64_t first = (int64_t)b * num_heads + (int64_t)h * group;
            const float* qh = q + first * head_dim;
            const int32_t* table = tables + b * table_stride;
            float* oh = out + first * head_dim;
            /* The common head sizes as constants: their loops compile to straight vector code. */
            if (head_dim == 64)
                attend(qh, pool, half, table, seq_lens[b], group, row_len, 64, block_size, h, scale, scores, oh);
            else if (head_dim == 128)
                attend(qh, pool, half, table, seq_lens[b], group, row_len, 128, block_size, h, scale, scores, oh);
            else
                attend(qh, pool, half, table, seq_lens[b], group, row_len, head_dim, block_size, h, scale, scores, oh);
            free(scores);
        }
    }
    return failed;
}
