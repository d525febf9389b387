/* The LM2 memory write scan on CPU, forward and backward, fused: model/write_scan.py builds and calls it.
 *
 * One "unit" is one (memory head, row) pair: its N x dh state goes through n segment writes (shared/LM2_MEMORY.md)
 *   A = M @ Wm + bias        [N, 3dh]  (q = A[:, :dh], already scaled; the gates' M rows in A[:, dh:])
 *   P = softmax(q @ kT)      [N, S]    (kT: the segment's keys, transposed [dh, S])
 *   U = P @ V                [N, dh]
 *   G = sigmoid(A[:, dh:] + U @ Wu)    [N, 2dh]  (input gate, then forget gate)
 *   M' = G[:, :dh] * tanh(U) + G[:, dh:] * M
 * Units are independent (head-local weights), so they run in parallel, one thread each, with no reductions
 * across threads: weight gradients are written per unit and summed over rows by the caller. The same inputs
 * give the same bits whatever the thread count.
 *
 * Layouts (row-major float32, HB = heads * rows, unit u = head * rows + row):
 *   start [HB, N, dh]; keys [n, HB, dh, S]; values [n, HB, S, dh]; wm [H, dh, 3dh]; bias [H, 3dh];
 *   wu [H, dh, 2dh]; states [HB, n + 1, N, dh] (start copied to index 0); saved per segment:
 *   q [n, HB, N, dh], probs [n, HB, N, S], u [n, HB, N, dh], gates [n, HB, N, 2dh].
 * Why C: at CPU sizes each of these matrices is a few thousand elements, and in PyTorch every write is some 40
 * operations, forward and backward, each below torch's parallel grain (bench/README.md).
 */
#include <math.h>
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

/* dst [cols, rows] = src [rows, cols]^T */
static void transpose(int rows, int cols, const float *restrict src, float *restrict dst) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) dst[j * rows + i] = src[i * cols + j];
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

typedef struct {
    int heads, rows, segments, slots, head_dim, seg_len;
} Shape;

static void forward_unit(const Shape *sh, int unit, const float *start, const float *keys, const float *values,
                         const float *wm, const float *bias, const float *wu, float *states, float *q_out,
                         float *probs_out, float *u_out, float *gates_out, float *scratch) {
    const int N = sh->slots, dh = sh->head_dim, S = sh->seg_len, HB = sh->heads * sh->rows;
    const int head = unit / sh->rows, state_size = N * dh;
    const float *w_mem = wm + (size_t)head * dh * 3 * dh, *w_u = wu + (size_t)head * dh * 2 * dh;
    const float *b = bias + (size_t)head * 3 * dh;
    float *a = scratch; /* [N, 3dh] */
    float *mine = states + (size_t)unit * (sh->segments + 1) * state_size;
    memcpy(mine, start + (size_t)unit * state_size, sizeof(float) * state_size);
    for (int s = 0; s < sh->segments; s++) {
        const size_t seg_unit = (size_t)s * HB + unit;
        const float *m = mine + (size_t)s * state_size, *kt = keys + seg_unit * dh * S;
        const float *v = values + seg_unit * S * dh;
        float *q = q_out + seg_unit * state_size, *p = probs_out + seg_unit * N * S;
        float *u = u_out + seg_unit * state_size, *g = gates_out + seg_unit * N * 2 * dh;
        float *next = mine + (size_t)(s + 1) * state_size;
        for (int i = 0; i < N; i++) memcpy(a + i * 3 * dh, b, sizeof(float) * 3 * dh);
        mm(N, dh, 3 * dh, m, dh, 1, w_mem, 3 * dh, a, 3 * dh);
        for (int i = 0; i < N; i++) memcpy(q + i * dh, a + i * 3 * dh, sizeof(float) * dh);
        memset(p, 0, sizeof(float) * N * S);
        mm(N, dh, S, q, dh, 1, kt, S, p, S);
        for (int i = 0; i < N; i++) {
            float *row = p + i * S, top = row[0], total = 0.0f;
#pragma omp simd reduction(max : top)
            for (int j = 1; j < S; j++) top = row[j] > top ? row[j] : top;
#pragma omp simd
            for (int j = 0; j < S; j++) row[j] = fast_exp(row[j] - top);
#pragma omp simd reduction(+ : total)
            for (int j = 0; j < S; j++) total += row[j];
            const float inverse = 1.0f / total;
#pragma omp simd
            for (int j = 0; j < S; j++) row[j] *= inverse;
        }
        memset(u, 0, sizeof(float) * state_size);
        mm(N, S, dh, p, S, 1, v, dh, u, dh);
        for (int i = 0; i < N; i++) memcpy(g + i * 2 * dh, a + i * 3 * dh + dh, sizeof(float) * 2 * dh);
        mm(N, dh, 2 * dh, u, dh, 1, w_u, 2 * dh, g, 2 * dh);
        for (int i = 0; i < N; i++) {
            float *restrict gi = g + i * 2 * dh, *restrict out = next + i * dh;
            const float *restrict ui = u + i * dh, *restrict mi = m + i * dh;
#pragma omp simd
            for (int j = 0; j < 2 * dh; j++) gi[j] = sigmoid(gi[j]);
#pragma omp simd
            for (int j = 0; j < dh; j++) out[j] = gi[j] * fast_tanh(ui[j]) + gi[dh + j] * mi[j];
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
    float *swap = d_p + N * S; /* [S, dh]: a segment's values or keys, transposed */
    float *dwm = d_wm + (size_t)unit * dh * 3 * dh, *dwu = d_wu + (size_t)unit * dh * 2 * dh;
    float *db = d_bias + (size_t)unit * 3 * dh;
    memset(carry, 0, sizeof(float) * state_size);
    memset(dwm, 0, sizeof(float) * dh * 3 * dh);
    memset(dwu, 0, sizeof(float) * dh * 2 * dh);
    memset(db, 0, sizeof(float) * 3 * dh);
    for (int s = sh->segments - 1; s >= 0; s--) {
        const size_t seg_unit = (size_t)s * HB + unit;
        const float *m = mine + (size_t)s * state_size, *kt = keys + seg_unit * dh * S;
        const float *v = values + seg_unit * S * dh, *q = q_in + seg_unit * state_size;
        const float *p = probs + seg_unit * N * S, *u = u_in + seg_unit * state_size;
        const float *g = gates + seg_unit * N * 2 * dh, *d_out = d_mine + (size_t)(s + 1) * state_size;
        float *dkt = d_keys + seg_unit * dh * S, *dv = d_values + seg_unit * S * dh;
        for (int i = 0; i < N; i++) {
            const float *restrict gi = g + i * 2 * dh, *restrict ui = u + i * dh, *restrict mi = m + i * dh;
            const float *restrict outside = d_out + i * dh, *restrict chain = carry + i * dh;
            float *restrict dn = d_next + i * dh, *restrict du = d_u + i * dh, *restrict dz = d_a + i * 3 * dh + dh;
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
        const float *dz = d_a + dh; /* the gates' pre-sigmoid gradient, rows of stride 3dh */
        mm(N, 2 * dh, dh, dz, 3 * dh, 1, w_u_t, dh, d_u, dh); /* dZ @ Wu^T */
        mm(dh, N, 2 * dh, u, 1, dh, dz, 3 * dh, dwu, 2 * dh); /* U^T @ dZ */
        transpose(S, dh, v, swap);
        memset(d_p, 0, sizeof(float) * N * S);
        mm(N, dh, S, d_u, dh, 1, swap, S, d_p, S); /* dU @ V^T */
        memset(dv, 0, sizeof(float) * S * dh);
        mm(S, N, dh, p, 1, S, d_u, dh, dv, dh); /* P^T @ dU */
        for (int i = 0; i < N; i++) {
            float *row = d_p + i * S, dot = 0.0f;
            const float *prow = p + i * S;
            for (int j = 0; j < S; j++) dot += row[j] * prow[j];
            for (int j = 0; j < S; j++) row[j] = prow[j] * (row[j] - dot);
        }
        transpose(dh, S, kt, swap);
        for (int i = 0; i < N; i++) memset(d_a + i * 3 * dh, 0, sizeof(float) * dh);
        mm(N, S, dh, d_p, S, 1, swap, dh, d_a, 3 * dh); /* dq = dScores @ K */
        memset(dkt, 0, sizeof(float) * dh * S);
        mm(dh, N, S, q, 1, dh, d_p, S, dkt, S); /* q^T @ dScores */
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

/* The entry points (ctypes): every unit on `threads` OpenMP threads (torch's own libgomp, loaded before this). */
void write_scan_forward(int heads, int rows, int segments, int slots, int head_dim, int seg_len, int threads,
                        const float *start, const float *keys, const float *values, const float *wm,
                        const float *bias, const float *wu, float *states, float *q, float *probs, float *u,
                        float *gates) {
    const Shape sh = {heads, rows, segments, slots, head_dim, seg_len};
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc(sizeof(float) * slots * 3 * head_dim);
#pragma omp for schedule(static)
        for (int unit = 0; unit < heads * rows; unit++)
            forward_unit(&sh, unit, start, keys, values, wm, bias, wu, states, q, probs, u, gates, scratch);
        free(scratch);
    }
}

void write_scan_backward(int heads, int rows, int segments, int slots, int head_dim, int seg_len, int threads,
                         const float *keys, const float *values, const float *wm_t, const float *wu_t,
                         const float *states, const float *q, const float *probs, const float *u,
                         const float *gates, const float *d_states, float *d_start, float *d_keys,
                         float *d_values, float *d_wm, float *d_bias, float *d_wu) {
    const Shape sh = {heads, rows, segments, slots, head_dim, seg_len};
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc(sizeof(float) * (slots * (3 * head_dim + 3 * head_dim + seg_len) + seg_len * head_dim));
#pragma omp for schedule(static)
        for (int unit = 0; unit < heads * rows; unit++)
            backward_unit(&sh, unit, keys, values, wm_t, wu_t, states, q, probs, u, gates, d_states, d_start,
                          d_keys, d_values, d_wm, d_bias, d_wu, scratch);
        free(scratch);
    }
}
