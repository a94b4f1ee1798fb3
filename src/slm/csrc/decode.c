/* One decode step of the slm transformer (both families) for a batch of rows, one new token each.

   Eager PyTorch spends most of a one-token step on per-operator overhead (docs/decode-speed.md); this is the
   same arithmetic as slm/model.py in one call: matrix products that stream each weight once for the whole
   batch, in register tiles of weight rows x batch rows (benchmarks/batch_step.py), split across OpenMP
   threads (PyTorch's own OpenMP runtime, so one thread pool), and small
   loops for the norms, rotary positions, attention and activations. Weights and KV cache are the model's
   own fp32 tensors; nothing is copied. Optionally the matrices are read from fp16 copies (half the bytes to
   stream, products still summed in fp32). Built on first use by slm/native.py with the system C compiler. */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A weight matrix [n_out, n_in] as nn.Linear stores it: fp32, or fp16 when f16 is set. */
typedef struct {
    const float *f32;
    const _Float16 *f16;
} Matrix;

typedef struct {
    const float *ln1_w, *ln1_b, *attn_b, *proj_b, *ln2_w, *ln2_b, *fc_b, *out_b;
    Matrix attn, proj, fc, out;
} Layer;

typedef struct {
    int llama;  /* 0: gpt2 (LayerNorm, GELU, learned positions), 1: llama (RMSNorm, SwiGLU, rotary) */
    int n_layer, d_model, n_head, n_kv_head, head_dim, hidden, vocab;
    float eps;
    const float *wte, *wpe, *lnf_w, *lnf_b, *rope_cos, *rope_sin;
    Matrix head;  /* the tied output embedding: wte, or its fp16 copy */
    const Layer *layers;
} Model;

/* The KV cache of slm/kv_cache.py: [n_layer, rows, kv_heads, max_len, head_dim], keys and values. */
typedef struct {
    float *k, *v;
    int rows, max_len;
} Cache;

/* A vector of floats (GCC and Clang vector extensions): as wide as the CPU's registers, AVX-512's 16 lanes or
   else 8 (AVX2, or whatever -march=native gives). */
#if defined(__AVX512F__)
#define LANES 16
#define WROWS 4 /* 32 registers: a 4 x 4 tile of accumulators */
#else
#define LANES 8
#define WROWS 2 /* 16 registers: a 2 x 4 tile */
#endif
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
#define BLOCK 4 /* a tile: WROWS weight rows times BLOCK batch rows, one accumulator each */

static inline vec load_f32(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vec load_weights(Matrix w, int64_t at, int half) {
    if (!half) return load_f32(w.f32 + at);
#if defined(__AVX512F__)  /* LANES halves widened in one instruction */
    return (vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w.f16 + at)));
#elif defined(__F16C__)
    return (vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.f16 + at)));
#else
    vec v;
    for (int i = 0; i < LANES; i++) v[i] = (float)w.f16[at + i];
    return v;
#endif
}

static inline float weight(Matrix w, int64_t at, int half) { return half ? (float)w.f16[at] : w.f32[at]; }

typedef float quad __attribute__((vector_size(4 * sizeof(float))));

static inline float sum_lanes(vec v) {  /* quarters added as vectors, then four lanes: few dependent adds */
    quad q, part;
    memcpy(&q, &v, sizeof q);
    for (int i = 4; i < LANES; i += 4) {
        memcpy(&part, (const char *)&v + i * sizeof(float), sizeof part);
        q += part;
    }
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* sums[i][r] = w[row + i, :] . x[r, :] for i < wrows (<= WROWS) and r < rows (<= BLOCK). Each piece of a weight
   row is loaded once for all the batch rows, and each piece of a batch row once for the weight rows. Every
   product is summed in the same order whatever the tile, so a row's logits do not depend on the batch it is
   decoded in. Inlined with constant sizes and weight type (`half`: fp16), so the accumulators stay in registers
   and the loop has no branch. */
static inline __attribute__((always_inline)) void dot_tile(Matrix w, int64_t row, const float *x, int n, int wrows,
                                                           int rows, int half, float sums[WROWS][BLOCK]) {
    vec acc[WROWS][BLOCK] = {{{0}}};
    int k = 0;
    for (; k + LANES <= n; k += LANES) {
        vec wk[WROWS];
        for (int i = 0; i < wrows; i++) wk[i] = load_weights(w, row + (int64_t)i * n + k, half);
        for (int r = 0; r < rows; r++) {
            vec xk = load_f32(x + (int64_t)r * n + k);
            for (int i = 0; i < wrows; i++) acc[i][r] += wk[i] * xk;
        }
    }
    for (int i = 0; i < wrows; i++)
        for (int r = 0; r < rows; r++) {
            float sum = sum_lanes(acc[i][r]);
            for (int j = k; j < n; j++) sum += weight(w, row + (int64_t)i * n + j, half) * x[(int64_t)r * n + j];
            sums[i][r] = sum;
        }
}

/* One case per tile size and weight type, so that each is inlined with constants. */
#define TILE(wrows, rows)                                                                               \
    case wrows * 8 + rows:                                                                              \
        if (w.f16) dot_tile(w, (int64_t)n * n_in, xb, n_in, wrows, rows, 1, sums);                      \
        else dot_tile(w, (int64_t)n * n_in, xb, n_in, wrows, rows, 0, sums);                            \
        break;
#define TILES(wrows) TILE(wrows, 4) TILE(wrows, 3) TILE(wrows, 2) TILE(wrows, 1)

/* out[b, n] = bias[n] + x[b, :] . w[n, :] for b < batch. Each weight row is read once for the whole batch
   (one row's decode is bound by streaming the weights), in tiles of WROWS x BLOCK products (a larger batch is
   bound by the multiply-adds, which then share their loads). */
static void matmul(float *out, const float *x, Matrix w, const float *bias, int batch, int n_in, int n_out) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_out; n += WROWS) {
        int wrows = n_out - n < WROWS ? n_out - n : WROWS;
        for (int b = 0; b < batch; b += BLOCK) {
            const float *xb = x + (int64_t)b * n_in;
            float sums[WROWS][BLOCK];
            int rows = batch - b < BLOCK ? batch - b : BLOCK;
            switch (wrows * 8 + rows) {
#if WROWS == 4
                TILES(4) TILES(3)
#endif
                TILES(2) TILES(1)
            }
            for (int i = 0; i < wrows; i++)
                for (int r = 0; r < rows; r++)
                    out[(int64_t)(b + r) * n_out + n + i] = bias ? sums[i][r] + bias[n + i] : sums[i][r];
        }
    }
}
#undef TILES
#undef TILE

static void norm(float *out, const float *x, const float *w, const float *b, int n, float eps, int rms) {
    float mean = 0.0f, var = 0.0f;
    if (!rms) {
        for (int i = 0; i < n; i++) mean += x[i];
        mean /= n;
    }
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float scale = 1.0f / sqrtf(var / n + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * scale * w[i] + (b ? b[i] : 0.0f);
}

/* x * cos + swap_halves(x) * sin, with sin's first half negated (slm/model.py's rotary_tables). */
static void rotate(float *x, const float *cos, const float *sin, int dim) {
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Softmax attention of one query head over cache slots 0..last of its key/value head. */
static void attend(float *out, const float *q, const float *k, const float *v, int last, int dim, float *scores) {
    float scale = 1.0f / sqrtf((float)dim), top = -INFINITY, total = 0.0f;
    for (int s = 0; s <= last; s++) {
        const float *key = k + (int64_t)s * dim;
        float dot = 0.0f;
        #pragma omp simd reduction(+ : dot)
        for (int i = 0; i < dim; i++) dot += q[i] * key[i];
        scores[s] = dot * scale;
        if (scores[s] > top) top = scores[s];
    }
    for (int s = 0; s <= last; s++) total += scores[s] = expf(scores[s] - top);
    memset(out, 0, sizeof(float) * dim);
    for (int s = 0; s <= last; s++) {
        const float *value = v + (int64_t)s * dim;
        float p = scores[s] / total;
        #pragma omp simd
        for (int i = 0; i < dim; i++) out[i] += p * value[i];
    }
}

static float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* Queries and keys rotated (llama), the new keys and values stored in each row's slot, then attention:
   one (row, head) pair per task. ``scores`` holds max_len floats per pair. */
static void attention(const Model *m, const Cache *c, int layer, float *qkv, float *out, const int64_t *pos,
                      int batch, float *scores) {
    int hd = m->head_dim, kv = m->n_kv_head, group = m->n_head / kv, width = (m->n_head + 2 * kv) * hd;
    for (int b = 0; b < batch; b++) {
        float *q = qkv + (int64_t)b * width, *k = q + m->n_head * hd, *v = k + kv * hd;
        if (m->llama)
            for (int h = 0; h < m->n_head + kv; h++)  /* queries and keys, one after the other */
                rotate(q + h * hd, m->rope_cos + pos[b] * hd, m->rope_sin + pos[b] * hd, hd);
        for (int g = 0; g < kv; g++) {
            int64_t slot = ((((int64_t)layer * c->rows + b) * kv + g) * c->max_len + pos[b]) * hd;
            memcpy(c->k + slot, k + g * hd, sizeof(float) * hd);
            memcpy(c->v + slot, v + g * hd, sizeof(float) * hd);
        }
    }
    /* Heads in parallel, a lone row's too: past a few hundred tokens attention is a good part of its step. */
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < batch; b++)
        for (int h = 0; h < m->n_head; h++) {
            int64_t head = (((int64_t)layer * c->rows + b) * kv + h / group) * c->max_len * hd;
            attend(out + (int64_t)b * m->d_model + h * hd, qkv + (int64_t)b * width + h * hd, c->k + head,
                   c->v + head, (int)pos[b], hd, scores + ((int64_t)b * m->n_head + h) * c->max_len);
        }
}

static void feed_forward(const Model *m, const Layer *l, const float *h, float *ff, float *out, int batch) {
    int d = m->d_model, f = m->hidden;
    if (m->llama) {  /* fused gate|up rows: silu(gate) * up into the first half */
        matmul(ff, h, l->fc, NULL, batch, d, 2 * f);
        for (int b = 0; b < batch; b++) {
            const float *gate = ff + (int64_t)b * 2 * f, *up = gate + f;
            float *act = ff + (int64_t)b * f;  /* row b's result lands before row b's inputs: safe in order */
            for (int i = 0; i < f; i++) act[i] = silu(gate[i]) * up[i];
        }
    } else {
        matmul(ff, h, l->fc, l->fc_b, batch, d, f);
        for (int64_t i = 0; i < (int64_t)batch * f; i++) ff[i] = gelu_tanh(ff[i]);
    }
    matmul(out, ff, l->out, l->out_b, batch, f, d);
}

static void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* Logits [batch, vocab] for tokens[b] at positions pos[b]; writes their keys and values into the cache. */
int slm_decode_step(const Model *m, const Cache *c, const int64_t *tokens, const int64_t *pos, int batch,
                    float *logits) {
    int d = m->d_model, width = (m->n_head + 2 * m->n_kv_head) * m->head_dim;
    int64_t bd = (int64_t)batch * d;
    float *x = malloc(sizeof(float) * bd), *h = malloc(sizeof(float) * bd), *att = malloc(sizeof(float) * bd);
    float *qkv = malloc(sizeof(float) * batch * width), *ff = malloc(sizeof(float) * batch * 2 * m->hidden);
    float *scores = malloc(sizeof(float) * batch * m->n_head * c->max_len);
    if (!x || !h || !att || !qkv || !ff || !scores) {  /* free(NULL) is a no-op: release what did succeed */
        free(x), free(h), free(att), free(qkv), free(ff), free(scores);
        return 1;
    }
    for (int b = 0; b < batch; b++) {
        memcpy(x + b * d, m->wte + tokens[b] * d, sizeof(float) * d);
        if (!m->llama) add(x + b * d, m->wpe + pos[b] * d, d);
    }
    for (int i = 0; i < m->n_layer; i++) {
        const Layer *l = &m->layers[i];
        for (int b = 0; b < batch; b++) norm(h + b * d, x + b * d, l->ln1_w, l->ln1_b, d, m->eps, m->llama);
        matmul(qkv, h, l->attn, l->attn_b, batch, d, width);
        attention(m, c, i, qkv, att, pos, batch, scores);
        matmul(h, att, l->proj, l->proj_b, batch, d, d);
        add(x, h, bd);
        for (int b = 0; b < batch; b++) norm(h + b * d, x + b * d, l->ln2_w, l->ln2_b, d, m->eps, m->llama);
        feed_forward(m, l, h, ff, att, batch);
        add(x, att, bd);
    }
    for (int b = 0; b < batch; b++) norm(h + b * d, x + b * d, m->lnf_w, m->lnf_b, d, m->eps, m->llama);
    matmul(logits, h, m->head, NULL, batch, d, m->vocab);
    free(x), free(h), free(att), free(qkv), free(ff), free(scores);
    return 0;
}
