/* The LM2 memory's write scan and read on CPU, forward and backward, fused: model/memory_kernels.py builds and
 * calls them.
 *
 * One "unit" is one (memory head, row) pair: its N x dh state goes through n segment writes (docs/memory.md)
 *   A = M @ Wm + bias        [N, 3dh]  (q = A[:, :dh], already scaled; the gates' M rows in A[:, dh:])
 *   P = softmax(q @ K^T)     [N, S]    (K, V: the segment's write keys and values [S, dh])
 *   U = P @ V                [N, dh]
 *   G = sigmoid(A[:, dh:] + U @ Wu)    [N, 2dh]  (input gate, then forget gate)
 *   M' = G[:, :dh] * tanh(U) + G[:, dh:] * M           (the paper's rule), or with Shape.convex
 *   M' = G[:, dh:] * M + (1 - G[:, dh:]) * tanh(U)     (the input gate is computed, unused, and gets zero gradient)
 * Units are independent (head-local weights), so they run in parallel, one thread each, with no reductions
 * across threads: weight gradients are written per unit and summed over rows by the caller. The same inputs
 * give the same bits whatever the thread count.
 *
 * Layouts (row-major float32, HB = heads * rows, unit u = head * rows + row):
 *   keys, values and their gradients: the token projections as they are, [rows, n * S, H * dh] with any row stride
 *   (a window is a slice of the row's tokens): no copy into a segment-major layout, forward or backward;
 *   start [HB, N, dh]; wm [H, dh, 3dh]; bias [H, 3dh];
 *   wu [H, dh, 2dh]; states [HB, n + 1, N, dh] (start copied to index 0); saved per segment:
 *   q [n, HB, N, dh], probs [n, HB, N, S], u [n, HB, N, dh], gates [n, HB, N, 2dh].
 * Why C: at CPU sizes each of these matrices is a few thousand elements, and in PyTorch every write is some 40
 * operations, forward and backward, each below torch's parallel grain (bench/NOTES.md).
 */
#include <stdlib.h>
#include <string.h>

/* C[i][j] += sum_k A(i, k) * B[k][j] with A(i, k) = a[i * a_row + k * a_col], B and C row-major with row strides
 * ldb and ldc. Blocks of 4 rows x 16 columns stay in registers across k; the edges take the plain loop. */
static void mm(int m, int kk, int n, const float *restrict a, int a_row, int a_col, const float *restrict b,
               int ldb, float *restrict c, int ldc) {
    const int m4 = m - m % 4, n16 = n - n % 16;
    for (int i = 0; i < m4; i += 4)
        for (int j = 0; j < n16; j += 16) {
            float acc[4][16];
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 16; l++) acc[r][l] = c[(i + r) * ldc + j + l];
            for (int k = 0; k < kk; k++) {
                const float *restrict brow = b + k * ldb + j;
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    const float coef = a[(i + r) * a_row + k * a_col];
#pragma omp simd
                    for (int l = 0; l < 16; l++) acc[r][l] += coef * brow[l];
                }
            }
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 16; l++) c[(i + r) * ldc + j + l] = acc[r][l];
        }
    for (int i = 0; i < m; i++) /* the edges: columns past n16 of every row, all columns of rows past m4 */
        for (int k = 0; k < kk; k++) {
            const float coef = a[i * a_row + k * a_col];
            for (int j = i < m4 ? n16 : 0; j < n; j++) c[i * ldc + j] += coef * b[k * ldb + j];
        }
}

/* dst [cols, rows] = src [rows, cols]^T, src rows ld apart */
static void transpose(int rows, int cols, const float *restrict src, int ld, float *restrict dst) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) dst[j * rows + i] = src[i * ld + j];
}

/* exp(x) to about 2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r), written so that
 * loops over it vectorize: libm's expf is a scalar call, and exps were half of the write's time. */
static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f;
    const int n = (int)(t + 128.5f) - 128; /* nearest integer (t + 128 > 0): floorf would not vectorize */
    const float r = x - (float)n * 0.693359375f + (float)n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int bits = (n + 127) << 23; /* 2^n, built in the exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float z) { return 1.0f / (1.0f + fast_exp(-z)); }

/* tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error about 1e-7, like the gates'. */
static inline float fast_tanh(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }

/* In place, each row of p [rows, cols]: scores -> probabilities. */
static void softmax_rows(int rows, int cols, float *p) {
    for (int i = 0; i < rows; i++) {
        float *row = p + i * cols, top = row[0], total = 0.0f;
#pragma omp simd reduction(max : top)
        for (int j = 1; j < cols; j++) top = row[j] > top ? row[j] : top;
#pragma omp simd
        for (int j = 0; j < cols; j++) row[j] = fast_exp(row[j] - top);
#pragma omp simd reduction(+ : total)
        for (int j = 0; j < cols; j++) total += row[j];
        const float inverse = 1.0f / total;
#pragma omp simd
        for (int j = 0; j < cols; j++) row[j] *= inverse;
    }
}

/* In place, each row of d [rows, cols]: the probabilities' gradient -> the scores' gradient, p the probabilities. */
static void softmax_backward_rows(int rows, int cols, const float *p, float *d) {
    for (int i = 0; i < rows; i++) {
        float *row = d + i * cols, dot = 0.0f;
        const float *prow = p + i * cols;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < cols; j++) dot += row[j] * prow[j];
#pragma omp simd
        for (int j = 0; j < cols; j++) row[j] = prow[j] * (row[j] - dot);
    }
}

/* The shapes and tensors of a call: model/memory_kernels.py mirrors these structs field by field (ctypes). */
typedef struct {
    int heads, rows, segments, slots, head_dim, seg_len, threads, convex; /* convex: the write rule, 0 or 1 */
    long token_row, grad_row; /* the row strides of keys/values and of their gradients (tokens are H * dh apart) */
} Shape;

typedef struct {
    const float *start, *keys, *values, *wm, *bias, *wu;
    float *states, *q, *probs, *u, *gates; /* the states, and what backward reads */
} ScanForward;

typedef struct {
    const float *keys, *values, *wm_t, *wu_t, *states, *q, *probs, *u, *gates, *d_states;
    float *d_start, *d_keys, *d_values, *d_wm, *d_bias, *d_wu;
} ScanBackward;

/* Where segment s of unit u starts in a [rows, tokens, H * dh] tensor with rows `row_stride` apart. */
static size_t token_offset(const Shape *sh, long row_stride, int unit, int s) {
    const int ld = sh->heads * sh->head_dim;
    return (size_t)(unit % sh->rows) * row_stride + (size_t)s * sh->seg_len * ld
           + (size_t)(unit / sh->rows) * sh->head_dim;
}

static void forward_unit(const Shape *sh, int unit, const float *start, const float *keys, const float *values,
                         const float *wm, const float *bias, const float *wu, float *states, float *q_out,
                         float *probs_out, float *u_out, float *gates_out, float *scratch) {
    const int N = sh->slots, dh = sh->head_dim, S = sh->seg_len, HB = sh->heads * sh->rows;
    const int head = unit / sh->rows, state_size = N * dh, ld = sh->heads * dh;
    const float *w_mem = wm + (size_t)head * dh * 3 * dh, *w_u = wu + (size_t)head * dh * 2 * dh;
    const float *b = bias + (size_t)head * 3 * dh;
    float *a = scratch; /* [N, 3dh] */
    float *mine = states + (size_t)unit * (sh->segments + 1) * state_size;
    memcpy(mine, start + (size_t)unit * state_size, sizeof(float) * state_size);
    for (int s = 0; s < sh->segments; s++) {
        const size_t seg_unit = (size_t)s * HB + unit;
        const float *m = mine + (size_t)s * state_size, *v = values + token_offset(sh, sh->token_row, unit, s);
        float *kt = a + N * 3 * dh; /* the segment's keys transposed, [dh, S] */
        transpose(S, dh, keys + token_offset(sh, sh->token_row, unit, s), ld, kt);
        float *q = q_out + seg_unit * state_size, *p = probs_out + seg_unit * N * S;
        float *u = u_out + seg_unit * state_size, *g = gates_out + seg_unit * N * 2 * dh;
        float *next = mine + (size_t)(s + 1) * state_size;
        for (int i = 0; i < N; i++) memcpy(a + i * 3 * dh, b, sizeof(float) * 3 * dh);
        mm(N, dh, 3 * dh, m, dh, 1, w_mem, 3 * dh, a, 3 * dh);
        for (int i = 0; i < N; i++) memcpy(q + i * dh, a + i * 3 * dh, sizeof(float) * dh);
        memset(p, 0, sizeof(float) * N * S);
        mm(N, dh, S, q, dh, 1, kt, S, p, S);
        softmax_rows(N, S, p);
        memset(u, 0, sizeof(float) * state_size);
        mm(N, S, dh, p, S, 1, v, ld, u, dh);
        for (int i = 0; i < N; i++) memcpy(g + i * 2 * dh, a + i * 3 * dh + dh, sizeof(float) * 2 * dh);
        mm(N, dh, 2 * dh, u, dh, 1, w_u, 2 * dh, g, 2 * dh);
        for (int i = 0; i < N; i++) {
            float *restrict gi = g + i * 2 * dh, *restrict out = next + i * dh;
            const float *restrict ui = u + i * dh, *restrict mi = m + i * dh;
#pragma omp simd
            for (int j = 0; j < 2 * dh; j++) gi[j] = sigmoid(gi[j]);
            if (sh->convex) {
#pragma omp simd
                for (int j = 0; j < dh; j++) out[j] = (1.0f - gi[dh + j]) * fast_tanh(ui[j]) + gi[dh + j] * mi[j];
            } else {
#pragma omp simd
                for (int j = 0; j < dh; j++) out[j] = gi[j] * fast_tanh(ui[j]) + gi[dh + j] * mi[j];
            }
        }
    }
}

/* Gradients of one unit, the segments in reverse. d_states [HB, n + 1, N, dh] is the gradient of every state
 * from outside the scan (the reads); the chain's own gradient is carried from each write to the state it read. */
static void backward_unit(const Shape *sh, int unit, const float *keys, const float *values, const float *wm_t,
                          const float *wu_t, const float *states, const float *q_in, const float *probs,
                          const float *u_in, const float *gates, const float *d_states, float *d_start,
                          float *d_keys, float *d_values, float *d_wm, float *d_bias, float *d_wu, float *scratch) {
    const int N = sh->slots, dh = sh->head_dim, S = sh->seg_len, HB = sh->heads * sh->rows;
    const int head = unit / sh->rows, state_size = N * dh;
    const float *w_mem_t = wm_t + (size_t)head * 3 * dh * dh, *w_u_t = wu_t + (size_t)head * 2 * dh * dh;
    const float *mine = states + (size_t)unit * (sh->segments + 1) * state_size;
    const float *d_mine = d_states + (size_t)unit * (sh->segments + 1) * state_size;
    float *carry = scratch, *d_next = carry + state_size, *d_u = d_next + state_size;
    float *d_a = d_u + state_size, *d_p = d_a + N * 3 * dh; /* d_a [N, 3dh]: dq then the gates' dZ; d_p [N, S] */
    float *swap = d_p + N * S; /* [dh, S]: a segment's values, transposed */
    const int ld = sh->heads * dh;
    float *dwm = d_wm + (size_t)unit * dh * 3 * dh, *dwu = d_wu + (size_t)unit * dh * 2 * dh;
    float *db = d_bias + (size_t)unit * 3 * dh;
    memset(carry, 0, sizeof(float) * state_size);
    memset(dwm, 0, sizeof(float) * dh * 3 * dh);
    memset(dwu, 0, sizeof(float) * dh * 2 * dh);
    memset(db, 0, sizeof(float) * 3 * dh);
    for (int s = sh->segments - 1; s >= 0; s--) {
        const size_t seg_unit = (size_t)s * HB + unit;
        const float *m = mine + (size_t)s * state_size, *k = keys + token_offset(sh, sh->token_row, unit, s);
        const float *v = values + token_offset(sh, sh->token_row, unit, s), *q = q_in + seg_unit * state_size;
        const float *p = probs + seg_unit * N * S, *u = u_in + seg_unit * state_size;
        const float *g = gates + seg_unit * N * 2 * dh, *d_out = d_mine + (size_t)(s + 1) * state_size;
        float *dk = d_keys + token_offset(sh, sh->grad_row, unit, s);
        float *dv = d_values + token_offset(sh, sh->grad_row, unit, s);
        for (int i = 0; i < N; i++) {
            const float *restrict gi = g + i * 2 * dh, *restrict ui = u + i * dh, *restrict mi = m + i * dh;
            const float *restrict outside = d_out + i * dh, *restrict chain = carry + i * dh;
            float *restrict dn = d_next + i * dh, *restrict du = d_u + i * dh, *restrict dz = d_a + i * 3 * dh + dh;
            if (sh->convex) { /* M' = g_f * M + (1 - g_f) * tanh(U): no input gate, g_f weighs M against tanh(U) */
#pragma omp simd
                for (int j = 0; j < dh; j++) {
                    const float dm = outside[j] + chain[j], t = fast_tanh(ui[j]), g_forget = gi[dh + j];
                    dn[j] = dm * g_forget;
                    du[j] = dm * (1.0f - g_forget) * (1.0f - t * t);
                    dz[j] = 0.0f;
                    dz[dh + j] = dm * (mi[j] - t) * g_forget * (1.0f - g_forget);
                }
            } else {
#pragma omp simd
                for (int j = 0; j < dh; j++) {
                    const float dm = outside[j] + chain[j], t = fast_tanh(ui[j]);
                    const float g_in = gi[j], g_forget = gi[dh + j];
                    dn[j] = dm * g_forget;
                    du[j] = dm * g_in * (1.0f - t * t);
                    dz[j] = dm * t * g_in * (1.0f - g_in);
                    dz[dh + j] = dm * mi[j] * g_forget * (1.0f - g_forget);
                }
            }
        }
        const float *dz = d_a + dh; /* the gates' pre-sigmoid gradient, rows of stride 3dh */
        mm(N, 2 * dh, dh, dz, 3 * dh, 1, w_u_t, dh, d_u, dh); /* dZ @ Wu^T */
        mm(dh, N, 2 * dh, u, 1, dh, dz, 3 * dh, dwu, 2 * dh); /* U^T @ dZ */
        transpose(S, dh, v, ld, swap);
        memset(d_p, 0, sizeof(float) * N * S);
        mm(N, dh, S, d_u, dh, 1, swap, S, d_p, S); /* dU @ V^T */
        for (int t = 0; t < S; t++) memset(dv + t * ld, 0, sizeof(float) * dh);
        mm(S, N, dh, p, 1, S, d_u, dh, dv, ld); /* P^T @ dU */
        softmax_backward_rows(N, S, p, d_p);
        for (int i = 0; i < N; i++) memset(d_a + i * 3 * dh, 0, sizeof(float) * dh);
        mm(N, S, dh, d_p, S, 1, k, ld, d_a, 3 * dh); /* dq = dScores @ K */
        for (int t = 0; t < S; t++) memset(dk + t * ld, 0, sizeof(float) * dh);
        mm(S, N, dh, d_p, 1, S, q, dh, dk, ld); /* dK = dScores^T @ q */
        memcpy(carry, d_next, sizeof(float) * state_size);
        mm(N, 3 * dh, dh, d_a, 3 * dh, 1, w_mem_t, dh, carry, dh); /* dA @ Wm^T */
        mm(dh, N, 3 * dh, m, 1, dh, d_a, 3 * dh, dwm, 3 * dh); /* M^T @ dA */
        for (int i = 0; i < N; i++)
            for (int j = 0; j < 3 * dh; j++) db[j] += d_a[i * 3 * dh + j];
    }
    const float *d_first = d_mine;
    float *mine_d_start = d_start + (size_t)unit * state_size;
    for (int at = 0; at < state_size; at++) mine_d_start[at] = d_first[at] + carry[at];
}

/* The entry points (ctypes): every unit on `threads` OpenMP threads (torch's own libgomp, loaded before this).
 * Each returns 0, or -1 when a thread could not allocate its scratch memory (its units are then not computed). */
int write_scan_forward(const Shape *sh, const ScanForward *t) {
    int failed = 0;
#pragma omp parallel num_threads(sh->threads)
    {
        float *scratch = malloc(sizeof(float) * (sh->slots * 3 * sh->head_dim + sh->head_dim * sh->seg_len));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int unit = 0; unit < sh->heads * sh->rows; unit++)
            if (scratch != NULL)
                forward_unit(sh, unit, t->start, t->keys, t->values, t->wm, t->bias, t->wu, t->states, t->q, t->probs,
                             t->u, t->gates, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}

int write_scan_backward(const Shape *sh, const ScanBackward *t) {
    const int N = sh->slots, dh = sh->head_dim, S = sh->seg_len;
    int failed = 0;
#pragma omp parallel num_threads(sh->threads)
    {
        float *scratch = malloc(sizeof(float) * (N * (3 * dh + 3 * dh + S) + S * dh));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int unit = 0; unit < sh->heads * sh->rows; unit++)
            if (scratch != NULL)
                backward_unit(sh, unit, t->keys, t->values, t->wm_t, t->wu_t, t->states, t->q, t->probs, t->u,
                              t->gates, t->d_states, t->d_start, t->d_keys, t->d_values, t->d_wm, t->d_bias, t->d_wu,
                              scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* The read, fused the same way. One unit is one (memory head, row segment) pair, u = head * row_segments + r with
 * r = row * k + s: the S tokens of segment s read M_s of their row.
 *   KV = M_s @ Wkv            [N, 2dh]  (keys, already scaled, then values)
 *   P = softmax(q @ K^T)      [S, N]
 *   R = P @ V                 [S, dh]
 *   G = sigmoid(R @ Wg + bg)  [S, dh]   (the output gate)
 *   out = G * R               written token-major, [rows, k * S, H * dh], where the output projection reads it
 * Layouts: q and out (and their gradients) [rows, k * S, H * dh] contiguous; states [H, rows * k, N, dh];
 * wkv [H, dh, 2dh]; wg [H, dh, dh]; bg [H, dh]; saved kv [H, rows * k, N, 2dh], probs [.., S, N], r and gates
 * [.., S, dh]. */
typedef struct {
    int heads, row_segments, slots, head_dim, seg_len, threads;
} ReadShape;

typedef struct {
    const float *q_tokens, *states, *wkv, *wg, *bg;
    float *out, *kv, *probs, *r, *gates; /* the gated read, and what backward reads */
} ReadForward;

typedef struct {
    const float *q_tokens, *states, *wkv_t, *wg_t, *kv, *probs, *r, *gates, *d_out;
    float *d_q, *d_states, *d_wkv, *d_wg, *d_bg;
} ReadBackward;

static size_t read_token_offset(const ReadShape *sh, int unit) {
    const int r = unit % sh->row_segments, head = unit / sh->row_segments;
    return (size_t)r * sh->seg_len * sh->heads * sh->head_dim + (size_t)head * sh->head_dim;
}

static void read_forward_unit(const ReadShape *sh, int unit, const float *q_tokens, const float *states,
                              const float *wkv, const float *wg, const float *bg, float *out, float *kv_out,
                              float *probs_out, float *r_out, float *gates_out, float *scratch) {
    const int N = sh->slots, dh = sh->head_dim, S = sh->seg_len, ld = sh->heads * dh, head = unit / sh->row_segments;
    const float *m = states + (size_t)unit * N * dh, *q = q_tokens + read_token_offset(sh, unit);
    float *kv = kv_out + (size_t)unit * N * 2 * dh, *p = probs_out + (size_t)unit * S * N;
    float *r = r_out + (size_t)unit * S * dh, *g = gates_out + (size_t)unit * S * dh;
    float *o = out + read_token_offset(sh, unit), *kt = scratch; /* kt: the keys transposed, [dh, N] */
    memset(kv, 0, sizeof(float) * N * 2 * dh);
    mm(N, dh, 2 * dh, m, dh, 1, wkv + (size_t)head * dh * 2 * dh, 2 * dh, kv, 2 * dh);
    transpose(N, dh, kv, 2 * dh, kt);
    memset(p, 0, sizeof(float) * S * N);
    mm(S, dh, N, q, ld, 1, kt, N, p, N);
    softmax_rows(S, N, p);
    memset(r, 0, sizeof(float) * S * dh);
    mm(S, N, dh, p, N, 1, kv + dh, 2 * dh, r, dh);
    for (int t = 0; t < S; t++) memcpy(g + t * dh, bg + (size_t)head * dh, sizeof(float) * dh);
    mm(S, dh, dh, r, dh, 1, wg + (size_t)head * dh * dh, dh, g, dh);
    for (int t = 0; t < S; t++) {
        float *restrict gt = g + t * dh, *restrict ot = o + t * ld;
        const float *restrict rt = r + t * dh;
#pragma omp simd
        for (int a = 0; a < dh; a++) {
            gt[a] = sigmoid(gt[a]);
            ot[a] = gt[a] * rt[a];
        }
    }
}

static void read_backward_unit(const ReadShape *sh, int unit, const float *q_tokens, const float *states,
                               const float *wkv_t, const float *wg_t, const float *kv, const float *probs,
                               const float *r_in, const float *gates, const float *d_out, float *d_q,
                               float *d_states, float *d_wkv, float *d_wg, float *d_bg, float *scratch) {
    const int N = sh->slots, dh = sh->head_dim, S = sh->seg_len, ld = sh->heads * dh, head = unit / sh->row_segments;
    const float *m = states + (size_t)unit * N * dh, *q = q_tokens + read_token_offset(sh, unit);
    const float *k = kv + (size_t)unit * N * 2 * dh, *p = probs + (size_t)unit * S * N;
    const float *r = r_in + (size_t)unit * S * dh, *g = gates + (size_t)unit * S * dh;
    const float *dout = d_out + read_token_offset(sh, unit);
    float *dq = d_q + read_token_offset(sh, unit), *dm = d_states + (size_t)unit * N * dh;
    float *dwkv = d_wkv + (size_t)unit * dh * 2 * dh, *dwg = d_wg + (size_t)unit * dh * dh;
    float *dbg = d_bg + (size_t)unit * dh;
    float *d_r = scratch, *d_z = d_r + S * dh, *d_p = d_z + S * dh, *d_kv = d_p + S * N, *vt = d_kv + N * 2 * dh;
    for (int t = 0; t < S; t++) {
        const float *restrict gt = g + t * dh, *restrict rt = r + t * dh, *restrict ot = dout + t * ld;
        float *restrict drt = d_r + t * dh, *restrict dzt = d_z + t * dh;
#pragma omp simd
        for (int a = 0; a < dh; a++) {
            drt[a] = ot[a] * gt[a];
            dzt[a] = ot[a] * rt[a] * gt[a] * (1.0f - gt[a]);
        }
    }
    mm(S, dh, dh, d_z, dh, 1, wg_t + (size_t)head * dh * dh, dh, d_r, dh); /* dZ @ Wg^T */
    memset(dwg, 0, sizeof(float) * dh * dh);
    mm(dh, S, dh, r, 1, dh, d_z, dh, dwg, dh); /* R^T @ dZ */
    memset(dbg, 0, sizeof(float) * dh);
    for (int t = 0; t < S; t++)
        for (int a = 0; a < dh; a++) dbg[a] += d_z[t * dh + a];
    transpose(N, dh, k + dh, 2 * dh, vt);
    memset(d_p, 0, sizeof(float) * S * N);
    mm(S, dh, N, d_r, dh, 1, vt, N, d_p, N); /* dR @ V^T */
    memset(d_kv, 0, sizeof(float) * N * 2 * dh);
    mm(N, S, dh, p, 1, N, d_r, dh, d_kv + dh, 2 * dh); /* dV = P^T @ dR */
    softmax_backward_rows(S, N, p, d_p);
    for (int t = 0; t < S; t++) memset(dq + t * ld, 0, sizeof(float) * dh);
    mm(S, N, dh, d_p, N, 1, k, 2 * dh, dq, ld); /* dq = dScores @ K */
    mm(N, S, dh, d_p, 1, N, q, ld, d_kv, 2 * dh); /* dK = dScores^T @ q */
    memset(dm, 0, sizeof(float) * N * dh);
    mm(N, 2 * dh, dh, d_kv, 2 * dh, 1, wkv_t + (size_t)head * 2 * dh * dh, dh, dm, dh); /* dKV @ Wkv^T */
    memset(dwkv, 0, sizeof(float) * dh * 2 * dh);
    mm(dh, N, 2 * dh, m, 1, dh, d_kv, 2 * dh, dwkv, 2 * dh); /* M^T @ dKV */
}

int read_forward(const ReadShape *sh, const ReadForward *t) {
    int failed = 0;
#pragma omp parallel num_threads(sh->threads)
    {
        float *scratch = malloc(sizeof(float) * sh->head_dim * sh->slots);
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int unit = 0; unit < sh->heads * sh->row_segments; unit++)
            if (scratch != NULL)
                read_forward_unit(sh, unit, t->q_tokens, t->states, t->wkv, t->wg, t->bg, t->out, t->kv, t->probs,
                                  t->r, t->gates, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}

int read_backward(const ReadShape *sh, const ReadBackward *t) {
    const int N = sh->slots, dh = sh->head_dim, S = sh->seg_len;
    int failed = 0;
#pragma omp parallel num_threads(sh->threads)
    {
        float *scratch = malloc(sizeof(float) * (2 * S * dh + S * N + 3 * N * dh));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int unit = 0; unit < sh->heads * sh->row_segments; unit++)
            if (scratch != NULL)
                read_backward_unit(sh, unit, t->q_tokens, t->states, t->wkv_t, t->wg_t, t->kv, t->probs, t->r,
                                   t->gates, t->d_out, t->d_q, t->d_states, t->d_wkv, t->d_wg, t->d_bg, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}
