"""CUDA source of paged decode attention (flash-decoding): one query token per sequence over the paged cache.

Grid (Hq / REP, B, splits): a CTA takes REP query heads sharing one KV head (GQA) of one sequence, over one
partition of its context (`split_len`: at least `min_part` tokens), and keeps an online softmax. A group of
HEAD_DIM / 8 lanes owns one token at a time, each lane 8 dimensions (16-byte loads of fp16 K/V; 8- or 4-byte
loads of int8/int4 codes, dequantized in registers with the token's (scale, zero)). Token groups combine through
shuffles, warps through shared memory.
One split writes the output; several write float32 partials that the last CTA of the (sequence, heads) group to
finish combines (SPLIT_REDUCE=1, `_cupy.arrive_last`; LMTRITON_SPLIT_REDUCE=block, and auto on small grids), or
`reduce_splits`, a second launch (=kernel, and auto on bigger grids: paged_attention.block_reduce).
Scores live in the log2 domain (q is pre-scaled by softmax_scale * log2(e)), so exp2f does the softmax.
Compile-time: IS_BF16, HEAD_DIM (64 | 128), KV_KIND (0 fp16/bf16, 1 int8, 2 int4), REP (1..8).
"""
from ._cupy import PRELUDE

# Shared with the tensor-core kernel (paged_attention_mma.py): how a sequence's context is cut into the grid's
# splits, and how a CTA merges its warps' softmax states and stores its result.
ATTN_COMMON = r"""
// Tokens per split of a ctx-token sequence cut into nsplit splits, at least min_part (a multiple of 16): a context
// of up to nsplit * min_part tokens uses min_part-token splits (the rest stay empty); a longer one gets longer
// splits, not more of them. Depends on ctx, nsplit and min_part only, never on the static bound of a CUDA graph.
__device__ __forceinline__ int split_len(int ctx, int nsplit, int min_part) {
    return max(min_part, 16 * ((ctx + 16 * nsplit - 1) / (16 * nsplit)));
}
__device__ __forceinline__ float rescale(float m, float m_new) { return m == NEG_INF ? 0.f : exp2f(m - m_new); }
#ifndef SPLIT_REDUCE
#define SPLIT_REDUCE 0
#endif
// Dimension d of head `head` from the float32 partials of its first n splits (reduce_splits and the last CTA).
template <int D>
__device__ __forceinline__ float combine_splits(const float* part_acc, const float* part_ml, long long head,
                                                int nsplit, int n, int d) {
    const float* ml = part_ml + head * nsplit * 2;
    float mm = NEG_INF;
#pragma unroll 4
    for (int s = 0; s < n; ++s) mm = fmaxf(mm, ld_cg(ml + s * 2));
    float ll = 0.f, aa = 0.f;
#pragma unroll 4
    for (int s = 0; s < n; ++s) {
        const float c = rescale(ld_cg(ml + s * 2), mm);
        ll += ld_cg(ml + s * 2 + 1) * c;
        aa += ld_cg(part_acc + (head * nsplit + s) * D + d) * c;
    }
    return ll > 0.f ? aa / ll : 0.f;
}
// Splits of a ctx-token sequence that hold tokens (the CTAs of the others return at once).
__device__ __forceinline__ int filled_splits(int ctx, int nsplit, int min_part) {
    const int partition = split_len(ctx, nsplit, min_part);
    return min(nsplit, (ctx + partition - 1) / partition);
}
// A split with no tokens: a lone split still owes its output, and so does split 0 of an empty sequence (padded rows
// of a CUDA graph) when the last CTA combines (no CTA of it arrives): zeros.
template <int R, int D, int NT>
__device__ __forceinline__ void store_empty(u16* __restrict__ out, long long head0, int nsplit, int split) {
    if (nsplit == 1 || (SPLIT_REDUCE && split == 0))
        for (int idx = threadIdx.x; idx < R * D; idx += NT) out[head0 * D + idx] = STOREF(0.f);
}
// After __syncthreads: merge the NW warps' (max, sum) and unnormalized sums of R heads x D dims, then write the
// output (one split) or this split's float32 partial (several; with SPLIT_REDUCE the last of the group's `nfilled`
// CTAs to arrive at `counter` combines them, otherwise reduce_splits). head0 = b * Hq + h0.
template <int NW, int R, int D, int NT>
__device__ __forceinline__ void store_cta(const float (&s_acc)[NW][R][D], const float (&s_ml)[NW][R][2],
                                          u16* __restrict__ out, float* __restrict__ part_acc,
                                          float* __restrict__ part_ml, long long head0, int nsplit, int split,
                                          int nfilled, unsigned* __restrict__ counter) {
    for (int idx = threadIdx.x; idx < R * D; idx += NT) {
        const int r = idx / D, d = idx % D;
        float mm = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) mm = fmaxf(mm, s_ml[w][r][0]);
        float ll = 0.f, aa = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float c = rescale(s_ml[w][r][0], mm);
            ll += s_ml[w][r][1] * c;
            aa += s_acc[w][r][d] * c;
        }
        const long long head = head0 + r;
        if (nsplit == 1) {
            out[head * D + d] = STOREF(ll > 0.f ? aa / ll : 0.f);
        } else {
            part_acc[(head * nsplit + split) * D + d] = aa;
            if (d == 0) { part_ml[(head * nsplit + split) * 2] = mm; part_ml[(head * nsplit + split) * 2 + 1] = ll; }
        }
    }
#if SPLIT_REDUCE
    if (nsplit > 1 && arrive_last(counter, nfilled))
        for (int idx = threadIdx.x; idx < R * D; idx += NT)
            out[(head0 + idx / D) * D + idx % D] = STOREF(combine_splits<D>(part_acc, part_ml, head0 + idx / D,
                                                                             nsplit, nfilled, idx % D));
#endif
}
"""

DECODE_SOURCE = PRELUDE + ATTN_COMMON + r"""
#define VEC 8
#define LPT (HEAD_DIM / VEC)            // lanes per token
#define TPW (32 / LPT)                  // tokens per warp at a time
#define NWARPS 4
#define NTHREADS (NWARPS * 32)
#define STEP (NWARPS * TPW)             // tokens per CTA at a time
#define UNROLL 4

// Raw bytes of 8 dims of one token: 16 (fp16/bf16), 8 (int8) or 4 (int4) bytes.
#if KV_KIND == 0
typedef uint4 raw_t;
#elif KV_KIND == 1
typedef uint2 raw_t;
#else
typedef unsigned raw_t;
#endif

// Codes -> floats without I2F: put the code in a float's mantissa (2^23 + c) and subtract 2^23.
__device__ __forceinline__ void to_float8(const raw_t r, float* x) {
#if KV_KIND == 0
    unpack8(r, x);
#elif KV_KIND == 1
#pragma unroll
    for (int i = 0; i < 8; ++i)
        x[i] = __uint_as_float(__byte_perm(i < 4 ? r.x : r.y, 0x4B000000u, 0x7650u | (i & 3))) - 8388608.f;
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __uint_as_float(((r >> (4 * i)) & 0xFu) | 0x4B000000u) - 8388608.f;
#endif
}

// Sum each of the REP partial scores over the LPT lanes of a token group; every lane gets all REP sums.
// REP == 4: two halving exchanges leave each lane one head's partial (2 + 1 shuffles), the remaining levels sum
// it, four indexed shuffles broadcast the totals: 9 shuffles and 5 adds instead of 16 and 16.
__device__ __forceinline__ void group_sum(float* s, int lane, int dl) {
#if REP == 4 && LPT >= 4
    constexpr int o1 = LPT / 2, o2 = LPT / 4;
    const bool b1 = dl & o1, b2 = dl & o2;
    const float a0 = (b1 ? s[2] : s[0]) + __shfl_xor_sync(0xffffffffu, b1 ? s[0] : s[2], o1);
    const float a1 = (b1 ? s[3] : s[1]) + __shfl_xor_sync(0xffffffffu, b1 ? s[1] : s[3], o1);
    float c = (b2 ? a1 : a0) + __shfl_xor_sync(0xffffffffu, b2 ? a0 : a1, o2);   // head 2*b1 + b2
#pragma unroll
    for (int o = o2 / 2; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    const int base = lane - dl;
#pragma unroll
    for (int r = 0; r < 4; ++r) s[r] = __shfl_sync(0xffffffffu, c, base + (r >> 1) * o1 + (r & 1) * o2);
#else
#pragma unroll
    for (int r = 0; r < REP; ++r)
#pragma unroll
        for (int o = LPT / 2; o > 0; o >>= 1) s[r] += __shfl_xor_sync(0xffffffffu, s[r], o);
#endif
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
paged_decode(const u16* __restrict__ q, const void* __restrict__ k_cache, const void* __restrict__ v_cache,
             const float* __restrict__ k_qp, const float* __restrict__ v_qp, const int* __restrict__ block_tables,
             int max_blocks, const int* __restrict__ context_lens, u16* __restrict__ out,
             float* __restrict__ part_acc, float* __restrict__ part_ml, int num_heads, int num_kv_heads,
             int bs_shift, int min_part, float qk_scale, unsigned* __restrict__ split_counters) {
    PDL_BEGIN();
    const int b = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int h0 = blockIdx.x * REP;
    const int kvh = h0 / (num_heads / num_kv_heads);
    const int ctx = context_lens[b];
    const int partition = split_len(ctx, nsplit, min_part);
    const int start = split * partition;
    if (start >= ctx) {     // nothing to read
        store_empty<REP, HEAD_DIM, NTHREADS>(out, (long long)b * num_heads + h0, nsplit, split);
        return;
    }
    const int end = min(start + partition, ctx);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int slot = lane / LPT, dl = lane % LPT;

    // qsum / pz carry the zero points of quantized K / V out of the per-dim loops:
    //   q.k = scale_k * sum(q_i c_i) + zero_k * sum(q_i);  sum_t p_t v_t = sum_t (p_t scale_v) c_t + sum_t p_t zero_v
    float qv[REP][8], acc[REP][8], m[REP], l[REP], qsum[REP], pz[REP];
#pragma unroll
    for (int r = 0; r < REP; ++r) {
        unpack8(*reinterpret_cast<const uint4*>(q + ((long long)b * num_heads + h0 + r) * HEAD_DIM + dl * 8), qv[r]);
        qsum[r] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) { qv[r][i] *= qk_scale; qsum[r] += qv[r][i]; acc[r][i] = 0.f; }
        m[r] = NEG_INF;
        l[r] = 0.f;
        pz[r] = 0.f;
    }
    const int* table = block_tables + (long long)b * max_blocks;
    const raw_t* kc = reinterpret_cast<const raw_t*>(k_cache);
    const raw_t* vc = reinterpret_cast<const raw_t*>(v_cache);

    for (int base = start + warp * TPW; base < end; base += STEP * UNROLL) {
        raw_t kr[UNROLL], vr[UNROLL];
#if KV_KIND != 0
        float2 kp[UNROLL], vp[UNROLL];
#endif
        bool valid[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {     // all loads first: UNROLL tokens of K and V in flight
            const int t = base + u * STEP + slot;
            valid[u] = t < end;
            const int tt = valid[u] ? t : start;
            const long long row = (((long long)table[tt >> bs_shift] * num_kv_heads + kvh) << bs_shift)
                                  + (tt & ((1 << bs_shift) - 1));
            kr[u] = kc[row * LPT + dl];
            vr[u] = vc[row * LPT + dl];
#if KV_KIND != 0
            kp[u] = *reinterpret_cast<const float2*>(k_qp + row * 2);
            vp[u] = *reinterpret_cast<const float2*>(v_qp + row * 2);
#endif
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            float kx[8], vx[8];
            to_float8(kr[u], kx);
            to_float8(vr[u], vx);
            float sc[REP];
#pragma unroll
            for (int r = 0; r < REP; ++r) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) s += qv[r][i] * kx[i];
#if KV_KIND != 0
                s = s * kp[u].x + qsum[r] * kp[u].y;
#endif
                sc[r] = s;
            }
            group_sum(sc, lane, dl);
#pragma unroll
            for (int r = 0; r < REP; ++r) {
                const float s = sc[r];
                if (valid[u]) {
                    if (s > m[r]) {            // rescale only when the running max grows
                        const float a = exp2f(m[r] - s);
                        l[r] *= a;
                        pz[r] *= a;
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[r][i] *= a;
                        m[r] = s;
                    }
                    float p = exp2f(s - m[r]);
                    l[r] += p;
#if KV_KIND != 0
                    pz[r] += p * vp[u].y;
                    p *= vp[u].x;
#endif
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[r][i] += p * vx[i];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < REP; ++r)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r][i] += pz[r];

    // combine the token groups of a warp (lanes that own the same dims)
#pragma unroll
    for (int o = LPT; o < 32; o <<= 1) {
#pragma unroll
        for (int r = 0; r < REP; ++r) {
            const float m_o = __shfl_xor_sync(0xffffffffu, m[r], o);
            const float l_o = __shfl_xor_sync(0xffffffffu, l[r], o);
            const float m_new = fmaxf(m[r], m_o);
            const float a = rescale(m[r], m_new), c = rescale(m_o, m_new);
            l[r] = l[r] * a + l_o * c;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float acc_o = __shfl_xor_sync(0xffffffffu, acc[r][i], o);
                acc[r][i] = acc[r][i] * a + acc_o * c;
            }
            m[r] = m_new;
        }
    }
    // combine warps
    __shared__ float s_acc[NWARPS][REP][HEAD_DIM];
    __shared__ float s_ml[NWARPS][REP][2];
    if (slot == 0) {
#pragma unroll
        for (int r = 0; r < REP; ++r) {
#pragma unroll
            for (int i = 0; i < 8; ++i) s_acc[warp][r][dl * 8 + i] = acc[r][i];
            if (dl == 0) { s_ml[warp][r][0] = m[r]; s_ml[warp][r][1] = l[r]; }
        }
    }
    __syncthreads();
    store_cta<NWARPS, REP, HEAD_DIM, NTHREADS>(s_acc, s_ml, out, part_acc, part_ml, (long long)b * num_heads + h0,
                                               nsplit, split, filled_splits(ctx, nsplit, min_part),
                                               split_counters + b * gridDim.x + blockIdx.x);
}

// One block per (sequence, query head), HEAD_DIM threads: combine the splits that hold tokens.
extern "C" __global__ void reduce_splits(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                         const int* __restrict__ context_lens, u16* __restrict__ out,
                                         int num_heads, int nsplit, int min_part) {
    PDL_BEGIN();
    const long long head = blockIdx.x;
    const int b = blockIdx.x / num_heads, d = threadIdx.x;
    const int n = filled_splits(context_lens[b], nsplit, min_part);
    out[head * HEAD_DIM + d] = STOREF(combine_splits<HEAD_DIM>(part_acc, part_ml, head, nsplit, n, d));
}
"""
