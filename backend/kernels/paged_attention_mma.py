"""CUDA source of paged decode attention on tensor cores (mma.sync m16n8k16, fp16/bf16 in, float32 accumulate).

Same arguments, split-K partition and partial format as paged_attention_cuda.paged_decode (its reduce_splits
combines the splits). Grid (Hk, B, splits): a CTA takes the G = Hq / Hk query heads of one KV head (G <= 8) over
one partition; each of its 4 warps takes 16-token tiles (a tile never straddles a block: block sizes are multiples
of 16) and keeps its own online softmax; warps combine through shared memory as in the CUDA-core kernel.
Per tile and warp:
  S = Q K^T     A = Q (16 x D: rows 0..G-1 the heads, the rest zero), B = K^T (D x 8 tokens), two n-tiles.
                Lane (g, t) (g = lane / 4, t = lane % 4) loads token g of each n-tile, a CH-element chunk of D per
                16-byte (or smaller) load; the order of the D (reduction) index is permuted the same way in Q and
                K so that each load feeds whole B registers (see `elem` in the kernel).
  O^T += V^T P^T  A = V^T (16 dims x 16 tokens), B = P^T (16 tokens x 8 heads): the S accumulators of lane (g, t)
                are exactly its P^T B registers (tokens 2t, 2t+1, 8+2t, 9+2t of head g), so P never leaves the
                registers; the lane loads those 4 tokens' V (VCH dims each) and pairs tokens per register (prmt).
int8/int4 K and V: codes go into the mma as MAGIC + c (one prmt or lop3 a register: the magic-number
  conversion without its subtraction), and scale, zero and MAGIC fold into the score and into P:
  q.k = s q.(M + c) + (z - M s) sum q;  sum_t p_t v_t = sum_t (p_t s_t)(M + c_t) + sum_t (p_t z_t - M (p_t s_t)),
  the last term one scalar a head carried beside l, with p_t s_t as rounded for the mma (so that M times it cancels
  exactly). bf16 int8 (128 + c exact below 128 only) keeps the exact codes and
  dequantizes V in registers (c * s + z, bf16x2 fma).
Scores are float32 in the log2 domain: S * (softmax_scale * log2 e), exp2f.
Compile-time: IS_BF16, HEAD_DIM (64 | 128), KV_KIND (0 fp16/bf16, 1 int8, 2 int4), REP (= G, 1..8), RAW_CODES
(0: the exact-code path for int8/int4 too).
"""
from ._cupy import PRELUDE
from .paged_attention_cuda import ATTN_COMMON

MMA_SOURCE = PRELUDE + ATTN_COMMON + r"""
typedef unsigned int u32;
#define NWARPS 4
#define NTHREADS (NWARPS * 32)
#if KV_KIND == 0
#define BITS 16
#define CH 8                                       // K elements per lane chunk (16 bytes)
#define VCH 8                                      // V elements per lane chunk (16 bytes)
#elif KV_KIND == 1
#define BITS 8
#define CH 16
#define VCH (HEAD_DIM / 8 < 16 ? HEAD_DIM / 8 : 16)
#else
#define BITS 4
#define CH (HEAD_DIM / 4 < 32 ? HEAD_DIM / 4 : 32)
#define VCH (HEAD_DIM / 8 < 32 ? HEAD_DIM / 8 : 32)
#endif
#define KW (CH * BITS / 32)                        // u32 words per K chunk
#define VW (VCH * BITS / 32)                       // u32 words per V chunk
#define KCHUNKS (HEAD_DIM / (4 * CH))              // K chunks per lane per token
#define VGROUPS (HEAD_DIM / (8 * VCH))             // V chunks per lane per token
#define SPC (CH / 4)                               // k-steps per K chunk
#define KSTEPS (HEAD_DIM / 16)
#define MTILES (HEAD_DIM / 16)
#define ROWW (HEAD_DIM * BITS / 32)                // u32 words per token row
#ifndef TILES                                      // tiles per warp in flight: ~8 KB of loads per warp
#define TILES (KV_KIND == 0 ? 1 : 2)             // int4: 2 measured 0.80x the time of 4 for MHA (H200)
#endif
#if IS_BF16
#define MAGIC 0x43004300u
#define MAGIC_F 128.f
#else
#define MAGIC 0x64006400u
#define MAGIC_F 1024.f
#endif
// RAW: quantized codes enter the mma as MAGIC + c and the offset folds into the zero points (the docstring has the
// algebra). Not bf16 int8: 128 + c is exact below 128 only.
#ifndef RAW_CODES
#define RAW_CODES 1
#endif
#define RAW (RAW_CODES && KV_KIND != 0 && !(IS_BF16 && KV_KIND == 1))

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel)); return d;
}
__device__ __forceinline__ u32 sub2(u32 a, u32 b) {
    u32 d;
#if IS_BF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(b), "r"(0xBF80BF80u), "r"(a));
#else
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
    return d;
}
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
#if IS_BF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#else
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#endif
    return d;
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {   // two floats -> f16x2 / bf16x2 (lo in bits 0..15)
    u32 d;
#if IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
#endif
    return d;
}
// Two codes in the low byte of each 16-bit half (other bits zero) -> their exact f16x2 / bf16x2 values.
// fp16: 1024 + c is exact for c < 1024. bf16: 128 + c only for c < 128, so bit 7 is added back as 128 exactly:
// (128 + (c & 127)) - (bit7 ? 0 : 128).
__device__ __forceinline__ u32 codes2(u32 c) {
#if IS_BF16 && KV_KIND == 1
    const u32 sub = ((c & 0x00800080u) ^ 0x00800080u) * 0x86u;   // 0x80 * 0x86 = 0x4300 (bf16 128.0)
    return sub2((c & 0x007F007Fu) | MAGIC, sub);
#else
    return sub2(c | MAGIC, MAGIC);
#endif
}
// Codes in the low bits of each 16-bit half: MAGIC + c (RAW) or c. int8 takes the magic byte through the prmt.
__device__ __forceinline__ u32 int8_pair(u32 w, u32 sel) {
#if RAW
    return prmt(w, 0x64646464u, sel);
#else
    return codes2(prmt(w, 0u, sel));
#endif
}
__device__ __forceinline__ u32 int4_pair(u32 w) {
#if RAW
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(0x000F000Fu), "n"(MAGIC));   // (w & m) | MAGIC
    return d;
#else
    return codes2(w & 0x000F000Fu);
#endif
}
__device__ __forceinline__ void mma16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if IS_BF16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <int N> __device__ __forceinline__ void load_words(const u32* __restrict__ p, u32* w) {
    if constexpr (N == 4) {
        const uint4 r = *reinterpret_cast<const uint4*>(p);
        w[0] = r.x; w[1] = r.y; w[2] = r.z; w[3] = r.w;
    }
    else if constexpr (N == 2) { const uint2 r = *reinterpret_cast<const uint2*>(p); w[0] = r.x; w[1] = r.y; }
    else { w[0] = *p; }
}
// Element of a K chunk that k-step s (within the chunk), B register r (0: k 2t..2t+1, 1: k 2t+8..2t+9), half h
// holds. Q's A fragment uses the same map, so the permutation of the reduction index cancels.
__device__ __forceinline__ int elem(int s, int r, int h) {
#if KV_KIND == 2
    return 8 * (s >> 1) + 2 * (s & 1) + r + 4 * h;   // (w >> 4k) & 0x000F000F holds elements k and k + 4
#else
    return 4 * s + 2 * r + h;
#endif
}
// The two B registers of k-step s of a K chunk (as codes or values).
__device__ __forceinline__ void k_regs(const u32* w, int s, u32& b0, u32& b1) {
#if KV_KIND == 0
    b0 = w[2 * s]; b1 = w[2 * s + 1];
#elif KV_KIND == 1
    b0 = int8_pair(w[s], 0x4140u); b1 = int8_pair(w[s], 0x4342u);
#else
    const u32 x = w[s >> 1] >> (8 * (s & 1));
    b0 = int4_pair(x); b1 = int4_pair(x >> 4);
#endif
}
// A registers (row g: dim 2i of the V chunk, row g+8: dim 2i+1) pairing token a (low half) with token b.
__device__ __forceinline__ void v_regs(const u32* wa, const u32* wb, int i, u32& lo, u32& hi) {
#if KV_KIND == 0
    lo = prmt(wa[i], wb[i], 0x5410u); hi = prmt(wa[i], wb[i], 0x7632u);
#elif KV_KIND == 1
    const int byte = 2 * (i & 1);
    const u32 sel = byte | ((byte + 4) << 4) | ((byte + 1) << 8) | ((byte + 5) << 12);   // a, b, a+1, b+1
    const u32 x = prmt(wa[i >> 1], wb[i >> 1], sel);
    lo = int8_pair(x, 0x4140u); hi = int8_pair(x, 0x4342u);
#else
    const int byte = i & 3;
    const u32 x = prmt(wa[i >> 2], wb[i >> 2], (u32)(byte | ((byte + 4) << 8)));
    lo = int4_pair(x); hi = int4_pair(x >> 4);
#endif
}


// One 16-token tile's raw K/V (and scale/zero) registers of a lane: K of tokens g, 8+g; V of tokens vtok(t4).
struct Tile {
    u32 kw[2][KCHUNKS][KW], vw[4][VGROUPS][VW];
#if KV_KIND != 0
    float2 kp[2], vp[4];
#endif
};
__device__ __forceinline__ void load_tile(Tile& T, const u32* __restrict__ kc, const u32* __restrict__ vc,
                                          const float* __restrict__ k_qp, const float* __restrict__ v_qp,
                                          const int* __restrict__ table, int t0, int num_kv_heads, int kvh,
                                          int bs_shift, int g, int t4) {
    const int vtok[4] = {2 * t4, 2 * t4 + 1, 8 + 2 * t4, 9 + 2 * t4};
    const long long row0 = (((long long)table[t0 >> bs_shift] * num_kv_heads + kvh) << bs_shift)
                           + (t0 & ((1 << bs_shift) - 1));
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int c = 0; c < KCHUNKS; ++c)
            load_words<KW>(kc + (row0 + n * 8 + g) * ROWW + (c * 4 * CH + t4 * CH) * BITS / 32, T.kw[n][c]);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int c = 0; c < VGROUPS; ++c)
            load_words<VW>(vc + (row0 + vtok[u]) * ROWW + (c * 8 * VCH + g * VCH) * BITS / 32, T.vw[u][c]);
#if KV_KIND != 0
#pragma unroll
    for (int n = 0; n < 2; ++n) T.kp[n] = *reinterpret_cast<const float2*>(k_qp + (row0 + n * 8 + g) * 2);
#pragma unroll
    for (int u = 0; u < 4; ++u) T.vp[u] = *reinterpret_cast<const float2*>(v_qp + (row0 + vtok[u]) * 2);
#endif
}

// Online softmax and both products over one tile (t0: its first token; tokens >= end are masked).
__device__ __forceinline__ void process_tile(Tile& T, int t0, int end, const u32 (&qa)[KSTEPS][2], float qsum,
                                             float qk_scale, float (&o)[MTILES][4], float& m, float& l,
                                             float& zacc, int g, int t4) {
    const int vtok[4] = {2 * t4, 2 * t4 + 1, 8 + 2 * t4, 9 + 2 * t4};
    // S = Q K^T: s[n][0..1] = head g, tokens 8n + 2t4 + {0, 1}
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int j = 0; j < KSTEPS; ++j) {
            u32 b0, b1;
            k_regs(T.kw[n][j / SPC], j % SPC, b0, b1);
            mma16816(s[n], qa[j][0], 0u, qa[j][1], 0u, b0, b1);
        }
    }
    float tmax = NEG_INF;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float x = s[n][e];
#if KV_KIND != 0   // the score's token is 8n + 2t4 + e: its scale/zero sit with lane (g' = 2t4 + e) of n-tile n
            const float ks = __shfl_sync(0xffffffffu, T.kp[n].x, (2 * t4 + e) * 4);
            const float kz = __shfl_sync(0xffffffffu, RAW ? fmaf(-MAGIC_F, T.kp[n].x, T.kp[n].y) : T.kp[n].y,
                                         (2 * t4 + e) * 4);
            x = x * ks + qsum * kz;
#endif
            x *= qk_scale;
            if (t0 + 8 * n + 2 * t4 + e >= end) x = NEG_INF;
            s[n][e] = x;
            tmax = fmaxf(tmax, x);
        }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
    const float m_new = fmaxf(m, tmax);              // finite: a tile holds at least one valid token
    const float alpha = exp2f(m - m_new);            // m = -inf -> 0
    m = m_new;
    float p[2][2];
    float psum = 0.f;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) { p[n][e] = exp2f(s[n][e] - m_new); psum += p[n][e]; }
    l = l * alpha + psum;
    // invalid tokens (past the context: stale or unwritten slots) must not reach the mma: p = 0 times NaN
    bool vvalid[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) vvalid[u] = t0 + vtok[u] < end;
#if RAW   // P^T scaled by each token's V scale; the zero term sum_t p_t (z_t - M s_t) of head g carried in zacc
    float vsc[4], zt = 0.f;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        vsc[u] = vvalid[u] ? T.vp[u].x : 0.f;
        zt += p[u >> 1][u & 1] * (vvalid[u] ? T.vp[u].y : 0.f);
    }
    const u32 pb0 = pack2(p[0][0] * vsc[0], p[0][1] * vsc[1]), pb1 = pack2(p[1][0] * vsc[2], p[1][1] * vsc[3]);
    // - M p_t s_t exactly as the mma sees p_t s_t (rounded to 16 bits): M times that rounding would not cancel
    zt -= MAGIC_F * ((LOADF((u16)(pb0 & 0xFFFFu)) + LOADF((u16)(pb0 >> 16)))
                     + (LOADF((u16)(pb1 & 0xFFFFu)) + LOADF((u16)(pb1 >> 16))));
    zacc = zacc * alpha + zt;
#else
    const u32 pb0 = pack2(p[0][0], p[0][1]), pb1 = pack2(p[1][0], p[1][1]);
#endif
    // the lane's accumulators hold heads 2t4 and 2t4 + 1: their rescale factors live with lanes g' = head
    const float a0 = __shfl_sync(0xffffffffu, alpha, (2 * t4) * 4);
    const float a1 = __shfl_sync(0xffffffffu, alpha, (2 * t4 + 1) * 4);
#pragma unroll
    for (int i = 0; i < MTILES; ++i) { o[i][0] *= a0; o[i][1] *= a1; o[i][2] *= a0; o[i][3] *= a1; }
#if KV_KIND != 0 && !RAW
    u32 vs[2], vz[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const float2 pa = T.vp[2 * k], pb = T.vp[2 * k + 1];
        vs[k] = pack2(vvalid[2 * k] ? pa.x : 0.f, vvalid[2 * k + 1] ? pb.x : 0.f);
        vz[k] = pack2(vvalid[2 * k] ? pa.y : 0.f, vvalid[2 * k + 1] ? pb.y : 0.f);
    }
#else
#pragma unroll
    for (int u = 0; u < 4; ++u)
        if (!vvalid[u])
#pragma unroll
            for (int c = 0; c < VGROUPS; ++c)
#pragma unroll
                for (int w = 0; w < VW; ++w) T.vw[u][c][w] = 0u;
#endif
    // O^T += V^T P^T; m-tile c * (VCH / 2) + i: row g = dim c*8*VCH + g*VCH + 2i, row g+8 = that + 1
#pragma unroll
    for (int c = 0; c < VGROUPS; ++c)
#pragma unroll
        for (int i = 0; i < VCH / 2; ++i) {
            u32 r0, r1, r2, r3;
            v_regs(T.vw[0][c], T.vw[1][c], i, r0, r1);
            v_regs(T.vw[2][c], T.vw[3][c], i, r2, r3);
#if KV_KIND != 0 && !RAW
            r0 = fma2(r0, vs[0], vz[0]); r1 = fma2(r1, vs[0], vz[0]);
            r2 = fma2(r2, vs[1], vz[1]); r3 = fma2(r3, vs[1], vz[1]);
#endif
            mma16816(o[c * (VCH / 2) + i], r0, r1, r2, r3, pb0, pb1);
        }
}

#ifndef MINB                                       // CTAs an SM the compiler budgets registers for
#define MINB 1
#endif
extern "C" __global__ void __launch_bounds__(NTHREADS, MINB)
paged_decode_mma(const u16* __restrict__ q, const void* __restrict__ k_cache, const void* __restrict__ v_cache,
                 const float* __restrict__ k_qp, const float* __restrict__ v_qp, const int* __restrict__ block_tables,
                 int max_blocks, const int* __restrict__ context_lens, u16* __restrict__ out,
                 float* __restrict__ part_acc, float* __restrict__ part_ml, int num_heads, int num_kv_heads,
                 int bs_shift, int min_part, float qk_scale, unsigned* __restrict__ split_counters) {
    PDL_BEGIN();
    const int kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int h0 = kvh * REP;
    const int ctx = context_lens[b];
    const int partition = split_len(ctx, nsplit, min_part);
    const int start = split * partition;
    if (start >= ctx) {
        store_empty<REP, HEAD_DIM, NTHREADS>(out, (long long)b * num_heads + h0, nsplit, split);
        return;
    }
    const int end = min(start + partition, ctx);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t4 = lane & 3;

    // Q's A fragment (rows >= REP and rows 8..15 are zero) and, for quantized K, sum(q) of head g.
    u32 qa[KSTEPS][2];
    float qsum = 0.f;
#pragma unroll
    for (int j = 0; j < KSTEPS; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float x[2] = {0.f, 0.f};
            if (g < REP) {
                const u16* qh = q + ((long long)b * num_heads + h0 + g) * HEAD_DIM + (j / SPC) * 4 * CH + t4 * CH;
#pragma unroll
                for (int h = 0; h < 2; ++h) x[h] = LOADF(qh[elem(j % SPC, r, h)]);
            }
            qa[j][r] = pack2(x[0], x[1]);
            qsum += x[0] + x[1];
        }
    qsum += __shfl_xor_sync(0xffffffffu, qsum, 1);
    qsum += __shfl_xor_sync(0xffffffffu, qsum, 2);

    float o[MTILES][4];
#pragma unroll
    for (int i = 0; i < MTILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m = NEG_INF, l = 0.f, zacc = 0.f;
    const int* table = block_tables + (long long)b * max_blocks;
    const u32* kc = reinterpret_cast<const u32*>(k_cache);
    const u32* vc = reinterpret_cast<const u32*>(v_cache);

    // TILES tiles of loads in flight per warp, then their math
    for (int t0 = start + warp * 16; t0 < end; t0 += NWARPS * 16 * TILES) {
        Tile T[TILES];
#pragma unroll
        for (int u = 0; u < TILES; ++u) {
            const int tu = t0 + u * NWARPS * 16;
            load_tile(T[u], kc, vc, k_qp, v_qp, table, tu < end ? tu : t0, num_kv_heads, kvh, bs_shift, g, t4);
        }
#pragma unroll
        for (int u = 0; u < TILES; ++u)
            if (t0 + u * NWARPS * 16 < end)     // warp-uniform
                process_tile(T[u], t0 + u * NWARPS * 16, end, qa, qsum, qk_scale, o, m, l, zacc, g, t4);
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
#if RAW   // the zero term is the same for every dim of a head: add it to the accumulators of heads 2t4, 2t4 + 1
    zacc += __shfl_xor_sync(0xffffffffu, zacc, 1);
    zacc += __shfl_xor_sync(0xffffffffu, zacc, 2);
    const float z0 = __shfl_sync(0xffffffffu, zacc, (2 * t4) * 4), z1 = __shfl_sync(0xffffffffu, zacc, (2 * t4 + 1) * 4);
#pragma unroll
    for (int i = 0; i < MTILES; ++i) { o[i][0] += z0; o[i][1] += z1; o[i][2] += z0; o[i][3] += z1; }
#endif

    // combine warps
    __shared__ float s_acc[NWARPS][REP][HEAD_DIM];
    __shared__ float s_ml[NWARPS][REP][2];
    if (t4 == 0 && g < REP) { s_ml[warp][g][0] = m; s_ml[warp][g][1] = l; }
#pragma unroll
    for (int c = 0; c < VGROUPS; ++c)
#pragma unroll
        for (int i = 0; i < VCH / 2; ++i) {
            const int d = c * 8 * VCH + g * VCH + 2 * i;
            const float* oo = o[c * (VCH / 2) + i];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int head = 2 * t4 + e;
                if (head < REP) { s_acc[warp][head][d] = oo[e]; s_acc[warp][head][d + 1] = oo[2 + e]; }
            }
        }
    __syncthreads();
    store_cta<NWARPS, REP, HEAD_DIM, NTHREADS>(s_acc, s_ml, out, part_acc, part_ml, (long long)b * num_heads + h0,
                                               nsplit, split, filled_splits(ctx, nsplit, min_part),
                                               split_counters + b * gridDim.x + blockIdx.x);
}
"""
