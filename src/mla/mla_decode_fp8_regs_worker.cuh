// Body of mla_decode_fp8_regs_kernel's worker warpgroups (mla_decode_fp8_regs.cuh), textually included inside the
// kernel, twice: as the plain body, and in the split variant inside a per-worker lambda where kG0 (this worker's first
// 128-channel group) is a compile-time constant. Not a standalone header: no include guard, no includes.
  uint8_t* sP = smem + L::kP + (kSplit ? kG0 : wk * 4) * L::kPCopy;   // this worker's P^T copies (one per group)
  float* red = reinterpret_cast<float*>(smem + L::kRed) + wk * 4 * kRedW;
  [[maybe_unused]] const int bar_max = 1 + 2 * wk, bar_p = 2 + 2 * wk, bar_q = 5;
  const int hpk = h_q / h_kv;
  const float kInf = __int_as_float(0x7f800000);
  constexpr float kSlack = 8.f;
  // wgmma B descriptors: one base each, operand offsets added as constants (start address field, 16-byte units)
  const uint64_t dq0 = sm90::make_desc_sw128(sm90::smem_addr(sQ), 16, 1024);
  const uint64_t dqg = dq0 + ((2 * kG0 * L::kQChunk) >> 4);   // the first Q chunk of this worker's groups
  const uint64_t dp0 = sm90::make_desc_sw128(sm90::smem_addr(sP), 16, 1024);
  const uint32_t sPa = sm90::smem_addr(sP);
  // ldmatrix rows: lane L addresses row L % 8 of matrix L / 8: tokens 8 (L / 8 % 2) + L % 8 of a k16 block,
  // channels 32 warp + 16 (L / 16) of a group (chunk h = L / 16).
  const uint32_t v_lane =
      (8 * ((lane / 8) % 2) + lane % 8) * kFp8TokenBytes + 16 * (lane / 16) + 32 * warp + 128 * kG0;
  [[maybe_unused]] constexpr int kBarX = 6;   // split: the two workers' partial S^T exchange (256 threads)
  [[maybe_unused]] constexpr int kBarP2 = 7;   // split rows: both workers' P^T rows written (256 threads)
  [[maybe_unused]] float* sX = reinterpret_cast<float*>(smem + L::kX) + wt;
  float* sScl = reinterpret_cast<float*>(smem + L::kScl);   // split rows: this page's O^T rescale factor per row
  float* sLt = sScl + kN;                                     // split rows: the request's row sums
  [[maybe_unused]] const int kR0 = kRowSplit ? 16 * wk : 0;                    // split rows: this worker's first row
  int page_idx = 0;

  for (int req = begin_req; req <= end_req; ++req) {
    [[maybe_unused]] const int nreq = req - begin_req;
    const int sk = seqlens[req];
    const int nblk = (sk + kPage - 1) / kPage;
    const int b0 = req == begin_req ? begin_blk : 0;
    const int b1 = req == end_req ? end_blk : nblk;

    // ---- Q (both workers): latent channels -> f16 times 2^(14 - e_r) (e_r: exponent of the row's largest |q|: its
    // largest lands in [2^14, 2^15), every bf16 value down to 2^-17 of it is exact), rope bf16; the k-position
    // permutation of the S^T fragments; zeros past the last row. ----
    sm90::bar_sync(bar_q, 256);   // both workers are done with the previous request's Q (and worker 0 with red)
    {
      constexpr int kTR = 256 / kN, kUR = 32 / kTR;   // threads per row, 16-channel units per thread
      const int row = wt2 / kTR, sub = wt2 % kTR;
      const bool vrow = row < rows;
      const T* qrow = q + req * q_sb + (row / hpk) * q_ss + (kvh * hpk + row % hpk) * q_sh;
      uint4 u[kUR][2];
      __nv_bfloat162 mx2 = __float2bfloat162_rn(0.f);
#pragma unroll
      for (int i = 0; i < kUR; ++i) {
        const int unit = sub + kTR * i;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          u[i][hh] = vrow ? __ldg(reinterpret_cast<const uint4*>(qrow + 16 * unit + 8 * hh)) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const uint32_t wd = word(u[i][hh], k);
            mx2 = __hmax2(mx2, __habs2(*reinterpret_cast<const __nv_bfloat162*>(&wd)));
          }
        }
      }
      float mx = fmaxf(__low2float(mx2), __high2float(mx2));
#pragma unroll
      for (int o = 1; o < kTR; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const int e = mx > 0.f ? max(exp_of(mx), -100) : 14;
      const float mul = pow2i(14 - e);
#pragma unroll
      for (int i = 0; i < kUR; ++i) {
        const int unit = sub + kTR * i, grp = unit / 8, tq = (unit % 8) / 2, c = 2 * grp + unit % 2;
        uint8_t* dst = sQ + c * L::kQChunk + row * 128;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const uint32_t wd = word(u[i][k / 4], k % 4);
          const int kp = q_kpos(k, tq);
          *reinterpret_cast<uint32_t*>(dst + (((kp / 8) ^ (row & 7)) << 4) + 2 * (kp % 8)) =
              pack_f16x2(__uint_as_float(wd << 16) * mul, __uint_as_float(wd & 0xffff0000u) * mul);
        }
      }
      if (sub == 0) {   // powers of two: the scalings below are exact
        sQinv[row] = pow2i(14 - e);
        sQms[row] = pow2i(e - 14) * scale_log2;
        sLim[row] = (causal && vrow) ? sk - s_q + row / hpk + 1 : sk;   // causal: query s sees sk - s_q + s + 1
        if (row == 0) *sEnd = b1;
      }
      if (wt2 < kN * 4) {   // rope: row wt2 / 4, 16 channels 16 tq.. as stored (bf16)
        const int rr = wt2 / 4, tq = wt2 % 4;
        uint4 r2[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (rr < rows) {
          const T* qr = q + req * q_sb + (rr / hpk) * q_ss + (kvh * hpk + rr % hpk) * q_sh + 512 + 16 * tq;
          r2[0] = __ldg(reinterpret_cast<const uint4*>(qr));
          r2[1] = __ldg(reinterpret_cast<const uint4*>(qr + 8));
        }
        uint8_t* dst = sQ + 8 * L::kQChunk + rr * 128;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int kp = q_kpos(k, tq);
          *reinterpret_cast<uint32_t*>(dst + (((kp / 8) ^ (rr & 7)) << 4) + 2 * (kp % 8)) = word(r2[k / 4], k % 4);
        }
      }
    }
    sm90::fence_proxy_async();    // generic writes, read by wgmma (async proxy)
    sm90::bar_sync(bar_q, 256);

    float o[2 * kNG][kN / 2];   // m64 blocks 2 G + h of this worker's groups G
#pragma unroll
    for (int mb = 0; mb < 2 * kNG; ++mb)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] = 0.f;
    int Mg[kMG];   // group g's O^T is in units of 2^(Mg[g] - 6); only moves up (split rows: all four groups)
    // fast softmax: 2^(Mg + 1) (a scale at or above it raises M_g; 0 before the first page) and 2^(6 - Mg)
    // (16 rows on alternate pages, or the split: m in registers there; split rows: a per-worker vote over its rows and
    // all four groups' scales, which both workers see alike, so M_g still moves in both on the same page)
    constexpr bool kFastMax = DEEPSTACK_FP8R_FAST_SOFTMAX != 0 && (kN == 16 || kSplit);   // (not: m in smem)
    [[maybe_unused]] float gthr[kMG], gmul[kMG];
#pragma unroll
    for (int gi = 0; gi < kMG; ++gi) {
      Mg[gi] = -1000;
      gthr[gi] = 0.f;
      gmul[gi] = 0.f;
    }
    // This thread's q rows: 8 j + 2 t + e (accumulator columns).
    // Per-row constants (sQinv, sQms, sLim) are read from shared memory where used: registers are short at 32 rows.
    // m, l: the running row maxima and this thread's partial row sums; at 32 rows kept in shared memory between
    // pages (one slot per thread: sM / sL[(2 j + e) * 128]): in registers, ptxas spilled loop values there (O^T,
    // the S^T chains and their fragments fill the rest).
    constexpr bool kStateSmem = kN == 32 && !kSplit;   // split: O^T is half as large, m and l fit
    // Split: the per-row constants in registers for the request (read from shared memory on every page otherwise).
    constexpr bool kRowRegs = kSplit;
    float rq_inv[kRowRegs ? kJ : 1][2], rq_ms[kRowRegs ? kJ : 1][2];
    int rq_lim[kRowRegs ? kJ : 1][2];
    if constexpr (kRowRegs) {
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          rq_inv[j][e] = sQinv[8 * j + 2 * t + e];
          rq_ms[j][e] = sQms[(8 * j + kR0) % kN + 2 * t + e];   // split rows: entries j < 2 are this worker's rows
          rq_lim[j][e] = sLim[(8 * j + kR0) % kN + 2 * t + e];
        }
    }
    float* sL = reinterpret_cast<float*>(smem + L::kL) + wk * (kN / 4) * 128 + wt;
    float* sM = sL + 2 * (kN / 4) * 128;
    float m[kJ][2], l[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        m[j][e] = -kInf;
        l[j][e] = 0.f;
        if constexpr (kStateSmem) {
          sL[(2 * j + e) * 128] = 0.f;
          sM[(2 * j + e) * 128] = -kInf;
        }
      }

#pragma unroll 1
    for (int blk = b0; blk < (kN == 32 && !kSplit ? *sEnd : b1); ++blk, ++page_idx) {
      if (!kSplit && (page_idx & 1) != wk) continue;
      // The page's ring stages (L::kSub of them; stage counter st0 + j over the CTA's range), all waited for here:
      // S^T's wgmma chains take every token.
      constexpr int kSub = L::kSub, kSubTok = L::kSubTok;
      const int st0 = page_idx * kSub;
      int rs[kSub];
#pragma unroll
      for (int j = 0; j < kSub; ++j) {
        rs[j] = (st0 + j) % kS;
        if (!DEEPSTACK_FP8R_ABL_NOLOAD || st0 + j < kS) sm90::mbar_wait(&full[rs[j]], ((st0 + j) / kS) & 1);
      }
      const int valid = min(sk - blk * kPage, kPage);

      // ---- S^T = K Q^T: the rope chain (bf16) into s, then 8 steps of 64 channels (f16), group accumulators
      // alternating; a group is folded into s (times its tokens' scales) while the next one runs ----
      const int ta = 16 * warp + g;   // this thread's tokens ta, ta + 8 (S^T rows g, g + 8 of the warp)
      const uint8_t* ra = sRaw + (kSub == 1 ? rs[0] : (st0 + 16 * warp / kSubTok) % kS) * L::kStageBytes +
                          (ta % kSubTok) * kFp8TokenBytes;   // (ta + 8: the same stage)
      const uint8_t* rb = ra + 8 * kFp8TokenBytes;
      // csc: the two tokens' scales (zeros past the valid tokens), x 2^(6 - M_g) once M_g is known. At 32 rows they
      // are loaded after S^T (the folds read their two scales from shared memory: registers are short there).
      constexpr bool kLateScales = kN == 32 && !kSplit;
      float csc[2][kMG];   // split: this worker's groups kG0, kG0 + 1 (split rows: all four)
      auto load_scales = [&]() {
        if constexpr (kSplit && !kRowSplit) {
          const float2 x = *reinterpret_cast<const float2*>(ra + 512 + 4 * kG0);
          const float2 y = *reinterpret_cast<const float2*>(rb + 512 + 4 * kG0);
          const bool va = ta < valid, vb = ta + 8 < valid;
          csc[0][0] = va ? x.x : 0.f; csc[0][1] = va ? x.y : 0.f;
          csc[1][0] = vb ? y.x : 0.f; csc[1][1] = vb ? y.y : 0.f;
        } else {
          const float4 x = *reinterpret_cast<const float4*>(ra + 512);
          const float4 y = *reinterpret_cast<const float4*>(rb + 512);
          const bool va = ta < valid, vb = ta + 8 < valid;
          csc[0][0] = va ? x.x : 0.f; csc[0][1] = va ? x.y : 0.f; csc[0][2] = va ? x.z : 0.f; csc[0][3] = va ? x.w : 0.f;
          csc[1][0] = vb ? y.x : 0.f; csc[1][1] = vb ? y.y : 0.f; csc[1][2] = vb ? y.z : 0.f; csc[1][3] = vb ? y.w : 0.f;
        }
      };
      if constexpr (!kLateScales) load_scales();
      float s[kN / 2];
      float acc[2][kN / 2];
      uint32_t fa[kQF][kQB][4];   // [buffer][k16 block of the commit][fragment register]
      if constexpr (kSplit) {   // worker wk: the rope's k16 blocks 2 wk, 2 wk + 1 (16 bytes per token and lane)
        const uint4 pa = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t + 16 * wk);
        const uint4 pb = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t + 16 * wk);
        uint32_t fr[2][4];
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          fr[x][0] = word(pa, 2 * x);
          fr[x][1] = word(pb, 2 * x);
          fr[x][2] = word(pa, 2 * x + 1);
          fr[x][3] = word(pb, 2 * x + 1);
        }
        const uint64_t dr = dq0 + ((8 * L::kQChunk + wk * 64) >> 4);
        sm90::wgmma_fence();
#pragma unroll
        for (int x = 0; x < 2; ++x) mma_rs<kN, false>(s, fr[x], dr + ((x * 32) >> 4), x != 0);
        sm90::wgmma_commit();
      } else {
        const uint4 pa0 = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t);
        const uint4 pa1 = *reinterpret_cast<const uint4*>(ra + 528 + 32 * t + 16);
        const uint4 pb0 = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t);
        const uint4 pb1 = *reinterpret_cast<const uint4*>(rb + 528 + 32 * t + 16);
        uint32_t fr[4][4];   // rope fragments: bf16 pairs as stored
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint4& pa = kk < 2 ? pa0 : pa1;
          const uint4& pb = kk < 2 ? pb0 : pb1;
          fr[kk][0] = word(pa, (2 * kk) % 4);
          fr[kk][1] = word(pb, (2 * kk) % 4);
          fr[kk][2] = word(pa, (2 * kk + 1) % 4);
          fr[kk][3] = word(pb, (2 * kk + 1) % 4);
        }
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          mma_rs<kN, false>(s, fr[kk], dq0 + ((8 * L::kQChunk + kk * 32) >> 4), kk != 0);
        sm90::wgmma_commit();
      }
      auto fold = [&](int grp) {   // s += scale[t, grp] * S_grp^T (the group's chain is complete)
        float (&ag)[kN / 2] = acc[grp % 2];   // grp: the worker's group index (split: group kG0 + grp)
        sm90::fence_regs(ag);
        float sc2[2];   // rows past the valid tokens may fold garbage: the mask below selects them out
        if constexpr (kLateScales) {
          sc2[0] = *reinterpret_cast<const float*>(ra + 512 + 4 * grp);
          sc2[1] = *reinterpret_cast<const float*>(rb + 512 + 4 * grp);
        } else if constexpr (kRowSplit) {   // (selects: a register array takes constant indices only)
          sc2[0] = wk ? csc[0][(2 + grp) % kMG] : csc[0][grp];
          sc2[1] = wk ? csc[1][(2 + grp) % kMG] : csc[1][grp];
        } else {
          sc2[0] = csc[0][grp];
          sc2[1] = csc[1][grp];
        }
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = 4 * j + 2 * a + e;
              s[i] = fmaf(ag[i], sc2[a], s[i]);
            }
      };
      // Commit groups: i = 0 the rope, then i = 1 + kQH c + hs: k16 blocks [kQB hs, kQB hs + kQB) of step c, with
      // fragment buffer i % kQF. Waiting for all but the last kQF - 1 before commit i (i >= kQF) frees its buffer and
      // completes every commit <= i - kQF: the rope at i = kQF, group g's last commit, (2g + 2) kQH, at
      // i = (2g + 2) kQH + kQF, where it is folded (before group g + 2 reuses its accumulator).
#pragma unroll
      for (int c = 0; c < kSteps; ++c) {   // (split: step c of this worker's groups, 2 kG0 + c of the row)
        const int grp = c / 2;
        const int off = 128 * (kG0 + grp) + 16 * (2 * t + (c % 2));
        const uint4 ua = *reinterpret_cast<const uint4*>(ra + off);
        const uint4 ub = *reinterpret_cast<const uint4*>(rb + off);
#pragma unroll
        for (int hs = 0; hs < kQH; ++hs) {
          const int i = 1 + kQH * c + hs, buf = i % kQF;
          if (i >= kQF) sm90::wgmma_wait<kQF - 1>();
          if (i == kQF) {   // the rope chain is done: carry it in units of 2^(e_r - 14)
            sm90::fence_regs(s);
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float qi = kRowRegs ? rq_inv[kRowRegs ? j : 0][e] : sQinv[8 * j + 2 * t + e];
                s[4 * j + e] *= qi;
                s[4 * j + 2 + e] *= qi;
              }
          }
#pragma unroll
          for (int gf = 0; gf < kNG; ++gf)
            if (i == (2 * gf + 2) * kQH + kQF) fold(gf);
#pragma unroll
          for (int x = 0; x < kQB; ++x) {
            const int kk = kQB * hs + x;
            cvt_e4m3x4(word(ua, kk), fa[buf][x][0], fa[buf][x][2]);
            cvt_e4m3x4(word(ub, kk), fa[buf][x][1], fa[buf][x][3]);
          }
          sm90::wgmma_fence();
#pragma unroll
          for (int x = 0; x < kQB; ++x) {
            const int kk = kQB * hs + x;
            mma_rs<kN, true>(acc[grp % 2], fa[buf][x], dqg + ((c * L::kQChunk + kk * 32) >> 4),
                             ((c % 2) | kk) != 0);
          }
          sm90::wgmma_commit();
        }
      }
      sm90::wgmma_wait<0>();
#pragma unroll
      for (int gf = 0; gf < kNG; ++gf)
        if ((2 * gf + 2) * kQH + kQF > kSteps * kQH) fold(gf);
      if constexpr (kLateScales) load_scales();
      if constexpr (kSplit) {
        // S^T = this worker's partial (its rope half, its two groups) + the other's, through shared memory; double
        // buffered by page parity (a worker writes a buffer again only after the next exchange barrier, which the
        // other passes after reading it). s0 + s1 is the same float in both workers, so their softmax states agree.
        float* xw = sX + (2 * (page_idx & 1) + wk) * (kN / 2) * 128;
        const float* xr = sX + (2 * (page_idx & 1) + (wk ^ 1)) * (kN / 2) * 128;
        if constexpr (kRowSplit && DEEPSTACK_FP8R_SPLIT_XV != 0) {   // the same, as float4 [i / 4][128 threads][4]
          float4* xw4 = reinterpret_cast<float4*>(smem + L::kX) + (2 * (page_idx & 1) + wk) * (kN / 8) * 128 + wt;
          const float4* xr4 =
              reinterpret_cast<const float4*>(smem + L::kX) + (2 * (page_idx & 1) + (wk ^ 1)) * (kN / 8) * 128 + wt;
#pragma unroll
          for (int i4 = 0; i4 < kN / 16; ++i4) {
            const int i = 4 * i4;
            xw4[i4 * 128] = wk ? make_float4(s[i], s[i + 1], s[i + 2], s[i + 3])
                               : make_float4(s[kN / 4 + i], s[kN / 4 + i + 1], s[kN / 4 + i + 2], s[kN / 4 + i + 3]);
          }
          sm90::bar_sync(kBarX, 256);
#pragma unroll
          for (int i4 = 0; i4 < kN / 16; ++i4) {
            const int i = 4 * i4;
            const float4 x = xr4[i4 * 128];
            s[i] = (wk ? s[kN / 4 + i] : s[i]) + x.x;
            s[i + 1] = (wk ? s[kN / 4 + i + 1] : s[i + 1]) + x.y;
            s[i + 2] = (wk ? s[kN / 4 + i + 2] : s[i + 2]) + x.z;
            s[i + 3] = (wk ? s[kN / 4 + i + 3] : s[i + 3]) + x.w;
          }
        } else if constexpr (kRowSplit) {   // send the other worker's rows (s[8 (1 - wk) + i]), keep s[0..7] = own rows
#pragma unroll
          for (int i = 0; i < kN / 4; ++i) xw[i * 128] = wk ? s[i] : s[kN / 4 + i];
          sm90::bar_sync(kBarX, 256);
#pragma unroll
          for (int i = 0; i < kN / 4; ++i) s[i] = (wk ? s[kN / 4 + i] : s[i]) + xr[i * 128];
        } else {
#pragma unroll
          for (int i = 0; i < kN / 2; ++i) xw[i * 128] = s[i];
          sm90::bar_sync(kBarX, 256);
#pragma unroll
          for (int i = 0; i < kN / 2; ++i) s[i] += xr[i * 128];
        }
      }

      // Mask (select: NaN never reaches the max), the scale 2^(e_r - 14) x softmax scale, and the tile max per row:
      // over this thread's two tokens, the 8 lanes of its column (g), then the 4 warps. Lane t also reduces group
      // t's largest scale of the page.
      const int tok0 = blk * kPage + ta;
#pragma unroll
      for (int j = 0; j < kJs; ++j)   // (split rows: this worker's rows kR0 + 8 j + 2 t + e, red slots 8 j + 2 t + e)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int lim = kRowRegs ? rq_lim[kRowRegs ? j : 0][e] : sLim[8 * j + 2 * t + e];
          const float qms = kRowRegs ? rq_ms[kRowRegs ? j : 0][e] : sQms[8 * j + 2 * t + e];
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            float& x = s[4 * j + 2 * a + e];
            x = tok0 + 8 * a < lim ? x * qms : -kInf;
          }
        }
      // Fast softmax: the full reduction only when some element or scale would move the running maxima (the
      // decisions below are the same either way).
      bool slow = true;
      if constexpr (kFastMax) {
        bool need = false;
#pragma unroll
        for (int j = 0; j < kJs; ++j)   // (split rows: the worker's own rows)
#pragma unroll
          for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int a = 0; a < 2; ++a) need |= s[4 * j + 2 * a + e] > m[j][e] + kSlack;
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int gi = 0; gi < kMG; ++gi) need |= csc[a][gi] >= gthr[gi];   // exponent above M_g (M_g >= -120)
        slow = bar_any(bar_max, 128, need);
      }
      float gfac[kMG];
      bool graise = false;
      float scl[kJ][2];
      bool any_up = false;
#pragma unroll
      for (int gi = 0; gi < kMG; ++gi) gfac[gi] = 1.f;
#pragma unroll
      for (int j = 0; j < kJ; ++j) scl[j][0] = scl[j][1] = 1.f;
      if (slow) {
#pragma unroll
      for (int j = 0; j < kJs; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = fmaxf(s[4 * j + e], s[4 * j + 2 + e]);
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
          if (g == 0) red[warp * kRedW + 8 * j + 2 * t + e] = v;
        }
      {
        float v;
        if constexpr (kSplit && !kRowSplit)   // lane t: the worker's group t % 2 (lanes 2, 3 repeat lanes 0, 1)
          v = fmaxf(t % 2 == 0 ? csc[0][0] : csc[0][1], t % 2 == 0 ? csc[1][0] : csc[1][1]);
        else
          v = fmaxf(t == 0 ? csc[0][0] : t == 1 ? csc[0][1] : t == 2 ? csc[0][2] : csc[0][3],
                    t == 0 ? csc[1][0] : t == 1 ? csc[1][1] : t == 2 ? csc[1][2] : csc[1][3]);
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
        if (g == 0) red[warp * kRedW + kN + t] = v;
      }
      sm90::bar_sync(bar_max, 128);
      {
        float gm[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float4 c4 = *reinterpret_cast<const float4*>(red + w * kRedW + kN);
          gm[0] = fmaxf(gm[0], c4.x); gm[1] = fmaxf(gm[1], c4.y); gm[2] = fmaxf(gm[2], c4.z); gm[3] = fmaxf(gm[3], c4.w);
        }
#pragma unroll
        for (int gi = 0; gi < kMG; ++gi) {
          const int mt = max(exp_of(gm[gi]), -120);   // same in every thread of the worker
          if (mt > Mg[gi]) {
            gfac[gi] = pow2i(Mg[gi] - mt);
            Mg[gi] = mt;
            graise = true;
          }
        }
        if constexpr (kFastMax) {
#pragma unroll
          for (int gi = 0; gi < kMG; ++gi) {
            gthr[gi] = pow2i(Mg[gi] + 1);
            gmul[gi] = pow2i(6 - Mg[gi]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kJs; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 8 * j + 2 * t + e;
          const float v = fmaxf(fmaxf(red[r], red[kRedW + r]), fmaxf(red[2 * kRedW + r], red[3 * kRedW + r]));
          // Lazy rescaling: the running max moves only when the tile's max exceeds it by more than kSlack (log2
          // units), so P <= 2^kSlack and O is rarely rescaled; out and lse use the same max, so the result is exact.
          float mr = kStateSmem ? sM[(2 * j + e) * 128] : m[j][e];
          if (v > mr + kSlack) {
            scl[j][e] = exp2_w(mr - v);
            mr = v;
            any_up = true;
          }
          if constexpr (kStateSmem) sM[(2 * j + e) * 128] = mr;
          else m[j][e] = mr;
        }
      }   // slow
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int gi = 0; gi < kMG; ++gi) csc[a][gi] *= kFastMax ? gmul[gi] : pow2i(6 - Mg[gi]);
#pragma unroll
      for (int j = 0; j < kJs; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float mr = kStateSmem ? sM[(2 * j + e) * 128] : m[j][e];
          const float base = mr == -kInf ? 0.f : mr;
          float sum = 0.f;
#pragma unroll
          for (int a = 0; a < 2; ++a) {
            float& x = s[4 * j + 2 * a + e];
            x = exp2_w(x - base);
            sum += x;
          }
          if constexpr (kStateSmem) sL[(2 * j + e) * 128] = sL[(2 * j + e) * 128] * scl[j][e] + sum;
          else l[j][e] = l[j][e] * scl[j][e] + sum;
        }
      // Four f16 P^T copies, group g's = P^T[t, r] scale[t, g] 2^(6 - M_g) <= 2^15 (P <= 2^kSlack, scale < 2^(M_g+1)).
      // stmatrix .trans: the accumulator fragment of 8 tokens x 8 rows (j, a) is stored as 8 rows of P^T; lane L
      // gives the address of row L % 8 of matrix L / 8 = 2 (j % 2) + a. (The previous P V is complete: every thread
      // waited for it.)
      {
        // (split rows: all four copies from their base, this worker's 16 rows)
        const uint32_t paddr = sPa - (kRowSplit ? kG0 * L::kPCopy - wk * 2048 : 0) +
                               swz(8 * (lane / 16) + lane % 8, 2 * warp + (lane / 8) % 2);
#pragma unroll
        for (int gi = 0; gi < kMG; ++gi)
#pragma unroll
          for (int jj = 0; jj < kJs / 2; ++jj) {
            uint32_t pr[4];
#pragma unroll
            for (int mtx = 0; mtx < 4; ++mtx) {
              const int j = 2 * jj + mtx / 2, a = mtx % 2;
              pr[mtx] = pack_f16x2(s[4 * j + 2 * a] * csc[a][gi], s[4 * j + 2 * a + 1] * csc[a][gi]);
            }
            fp8small::stmatrix_x4_trans(paddr + gi * L::kPCopy + jj * 2048, pr[0], pr[1], pr[2], pr[3]);
          }
      }
      // O^T (this worker's m64 blocks) times its row's factor f[j][e] and its block's group factor gfc[mb / 2]
      const auto rescale_o = [&](const float (&f)[kJ][2], const float* gfc) {
#pragma unroll
        for (int mb = 0; mb < 2 * kNG; ++mb)
#pragma unroll
          for (int j = 0; j < kJ; ++j)
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
              for (int e = 0; e < 2; ++e) o[mb][4 * j + 2 * a + e] *= f[j][e] * gfc[mb / 2];
      };
      if constexpr (kRowSplit) {
        // Own rows' rescale factors out, both workers' P^T rows complete (and every thread done with red), then the
        // other rows' factors in: O^T (this worker's groups, all rows) rescaled by row and by its groups' exponents.
        if (warp == 0 && g == 0) {
#pragma unroll
          for (int j = 0; j < kJs; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) sScl[kR0 + 8 * j + 2 * t + e] = scl[j][e];
        }
        sm90::fence_proxy_async();
        // DEEPSTACK_FP8R_SPLIT_P2VOTE: the barrier also asks whether any row's maximum or any group's exponent moved
        // on this page (in either worker); if none, every factor below is 1: skip reading them.
        bool moved = true;
        if constexpr (DEEPSTACK_FP8R_SPLIT_P2VOTE != 0) moved = bar_any(kBarP2, 256, any_up || graise);
        else sm90::bar_sync(kBarP2, 256);
        if (moved) {
        float sa[kJ][2];   // factors of rows 8 j + 2 t + e
        bool need = false;
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float own = scl[j % kJs][e];
            const float other = sScl[(8 * j + 2 * t + e) % kN];
            sa[j][e] = (j / kJs == wk) ? own : other;
            need |= sa[j][e] != 1.f;
          }
        const float gf[2] = {wk ? gfac[2 % kMG] : gfac[0], wk ? gfac[3 % kMG] : gfac[1 % kMG]};
        if (__any_sync(0xffffffffu, need) || gf[0] != 1.f || gf[1] != 1.f) rescale_o(sa, gf);
        }
      } else {
        if (__any_sync(0xffffffffu, any_up) || graise) rescale_o(scl, gfac);
        sm90::fence_proxy_async();
        sm90::bar_sync(bar_p, 128);   // P^T complete (and every thread is done with red)
      }

      // ---- O^T += V^T P^T_g, A from registers: per k16 block kk, batches of kGB groups (blocks 2 G, 2 G + 1 each):
      // one ldmatrix.x4.trans per group, prmt + cvt; fragments double-buffered by batch ----

#pragma unroll
      for (int mb = 0; mb < 2 * kNG; ++mb) sm90::fence_regs(o[mb]);
      {
        uint32_t vbase[kSub];   // stage j's rows, this lane's ldmatrix row and channels
#pragma unroll
        for (int j = 0; j < kSub; ++j) vbase[j] = sm90::smem_addr(sRaw) + rs[j] * L::kStageBytes + v_lane;
        uint32_t pa[kPF][2 * kGB][4];   // [buffer][block of the batch][fragment register]
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int bt = 0; bt < kBatches; ++bt) {
            const int step = kk * kBatches + bt, buf = step % kPF;
            uint32_t r[kGB][4];
#pragma unroll
            for (int x = 0; x < kGB; ++x)
              ldsm_x4_trans(vbase[16 * kk / kSubTok] + (16 * kk % kSubTok) * kFp8TokenBytes + 128 * (kGB * bt + x), r[x]);
            // this worker's last read of a ring stage (its last k16 block): back to the copies
            if (!DEEPSTACK_FP8R_ABL_NOLOAD && bt == kBatches - 1 && (16 * kk + 16) % kSubTok == 0)
              sm90::mbar_arrive(&empty[rs[16 * kk / kSubTok]]);
            if (step >= kPF) sm90::wgmma_wait<kPF - 1>();   // the batch that used pa[buf] is done
#pragma unroll
            for (int x = 0; x < kGB; ++x)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                // matrix 2h: tokens 0-7 of the block (fragment regs 0, 1), 2h + 1: tokens 8-15 (regs 2, 3)
                const uint32_t p0 = prmt(r[x][2 * h], 0x3120u), p1 = prmt(r[x][2 * h + 1], 0x3120u);
                uint32_t (&f)[4] = pa[buf][2 * x + h];
                cvt_e4m3x4(p0, f[0], f[1]);
                cvt_e4m3x4(p1, f[2], f[3]);
              }
            if (16 * kk + 16 > valid) {   // stale bytes past s_k: zeros (0 x NaN would reach O)
              int vl = valid;
              if constexpr (DEEPSTACK_FP8R_LEAN != 0) asm volatile("" : "+r"(vl));   // (keeps the masks in here)
              const int tk = 16 * kk + 2 * t;
              const uint32_t m01 = (tk < vl ? 0x0000FFFFu : 0u) | (tk + 1 < vl ? 0xFFFF0000u : 0u);
              const uint32_t m23 = (tk + 8 < vl ? 0x0000FFFFu : 0u) | (tk + 9 < vl ? 0xFFFF0000u : 0u);
#pragma unroll
              for (int bl = 0; bl < 2 * kGB; ++bl) {
                pa[buf][bl][0] &= m01;
                pa[buf][bl][1] &= m01;
                pa[buf][bl][2] &= m23;
                pa[buf][bl][3] &= m23;
              }
            }
            sm90::wgmma_fence();
#pragma unroll
            for (int bl = 0; bl < 2 * kGB; ++bl) {
              const int mb = 2 * kGB * bt + bl;
              mma_rs<kN, true>(o[mb], pa[buf][bl],
                               dp0 + (((mb / 2) * L::kPCopy + kk * 32) >> 4), 1);
            }
            sm90::wgmma_commit();
          }
        }
      sm90::wgmma_wait<0>();
      }
#pragma unroll
      for (int mb = 0; mb < 2 * kNG; ++mb) sm90::fence_regs(o[mb]);
    }

    // (32 rows: m and l stay in shared memory through the merge, the register peak of the request end, too)
    auto m_of = [&](int j, int e) { return kStateSmem ? sM[(2 * j + e) * 128] : m[j][e]; };
    auto l_of = [&](int j, int e) { return kStateSmem ? sL[(2 * j + e) * 128] : l[j][e]; };
    // ---- O^T to true units; merge the two workers' partials of this request (worker 1 -> scratch -> worker 0) ----
#pragma unroll
    for (int mb = 0; mb < 2 * kNG; ++mb) {
      const float f = pow2i((kRowSplit ? (wk ? Mg[(2 + mb / 2) % kMG] : Mg[mb / 2]) : Mg[mb / 2]) - 6);
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[mb][i] *= f;
    }
    if constexpr (!kSplit) {   // (split: each worker holds the whole request for its channels, nothing to merge)
    float* scratch =   // (formed here: registers are short in the page loop at 32 rows)
        merge_scratch + ((static_cast<long long>(blockIdx.y) * gridDim.x + blockIdx.x) * kMerge) * 128 + wt;
    if (wk == 1) {
      if (nreq > 0) sm90::mbar_wait(merge_free, (nreq - 1) & 1);   // worker 0 has read the previous one
#pragma unroll
      for (int mb = 0; mb < 8; ++mb)
#pragma unroll
        for (int i = 0; i < kN / 2; ++i) __stcg(scratch + (mb * (kN / 2) + i) * 128, o[mb][i]);
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          __stcg(scratch + (8 * (kN / 2) + 2 * j + e) * 128, m_of(j, e));
          __stcg(scratch + (8 * (kN / 2) + 2 * kJ + 2 * j + e) * 128, l_of(j, e));
        }
      sm90::mbar_arrive(merged);
      continue;
    }
    sm90::mbar_wait(merged, nreq & 1);
    {
      float f0[kJ][2], f1[kJ][2];
#pragma unroll
      for (int j = 0; j < kJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float m1 = __ldcg(scratch + (8 * (kN / 2) + 2 * j + e) * 128);
          const float l1 = __ldcg(scratch + (8 * (kN / 2) + 2 * kJ + 2 * j + e) * 128);
          const float m0 = m_of(j, e);
          const float mx = fmaxf(m0, m1);
          f0[j][e] = mx == -kInf ? 0.f : exp2_w(m0 - mx);
          f1[j][e] = mx == -kInf ? 0.f : exp2_w(m1 - mx);
          const float lm = l_of(j, e) * f0[j][e] + l1 * f1[j][e];
          if constexpr (kStateSmem) {
            sM[(2 * j + e) * 128] = mx;
            sL[(2 * j + e) * 128] = lm;
          } else {
            m[j][e] = mx;
            l[j][e] = lm;
          }
        }
#pragma unroll
      for (int mb = 0; mb < 8; ++mb)
#pragma unroll
        for (int j = 0; j < kJ; ++j)
#pragma unroll
          for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int i = 4 * j + 2 * a + e;
              o[mb][i] = o[mb][i] * f0[j][e] + __ldcg(scratch + (mb * (kN / 2) + i) * 128) * f1[j][e];
            }
    }
    sm90::mbar_arrive(merge_free);
    }

    // ---- finish this request: row sums over the 8 lanes of a column and the 4 warps, then out/lse or partials ----
    const int split = req == begin_req ? meta[4] : num_splits[req];   // meta[4]: this part's first split
    const bool single = num_splits[req + 1] - num_splits[req] == 1;
#pragma unroll
    for (int j = 0; j < kJs; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = l_of(j, e);
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (g == 0) red[warp * kRedW + 8 * j + 2 * t + e] = v;
      }
    sm90::bar_sync(bar_max, 128);
    const float empty_lse = single ? kInf : -kInf;
    const float kLn2 = 0.6931471805599453f;
    if constexpr (kRowSplit) {   // own rows: the sum to sLt, lse; then every row's sum from sLt
#pragma unroll
      for (int j = 0; j < kJs; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int rl = 8 * j + 2 * t + e, r = kR0 + rl;
          const float lt = red[rl] + red[kRedW + rl] + red[2 * kRedW + rl] + red[3 * kRedW + rl];
          if (warp == 0 && g == 0) {
            sLt[r] = lt;
            if (r < rows) {
              const float v = lt > 0.f ? (m[j][e] + log2f(lt)) * kLn2 : empty_lse;
              if (single) lse[(static_cast<long long>(req) * h_q + kvh * hpk + r % hpk) * s_q + r / hpk] = v;
              else lse_accum[(static_cast<long long>(split) * h_kv + kvh) * rows + r] = v;
            }
          }
        }
      sm90::bar_sync(kBarP2, 256);
    }
    const int ch0 = 32 * warp + 2 * g;   // block mb = 2 G + h: channels 128 G + 16 h + ch0 (+1)
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * t + e;
        if (r >= rows) continue;
        const float lt = kRowSplit ? sLt[r] : red[r] + red[kRedW + r] + red[2 * kRedW + r] + red[3 * kRedW + r];
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        if (!kRowSplit && warp == 0 && g == 0 && (!kSplit || wk == 0)) {   // (split: both workers hold the same m, l)
          const float v = lt > 0.f ? (m_of(j, e) + log2f(lt)) * kLn2 : empty_lse;
          if (single) lse[(static_cast<long long>(req) * h_q + kvh * hpk + r % hpk) * s_q + r / hpk] = v;
          else lse_accum[(static_cast<long long>(split) * h_kv + kvh) * rows + r] = v;
        }
        if (single) {
          T* dst = out + ((static_cast<long long>(req) * s_q + r / hpk) * h_q + kvh * hpk + r % hpk) * kDV + ch0;
#pragma unroll
          for (int mb = 0; mb < 2 * kNG; ++mb) {
            const __nv_bfloat162 p = __floats2bfloat162_rn(o[mb][4 * j + e] * inv, o[mb][4 * j + 2 + e] * inv);
            *reinterpret_cast<__nv_bfloat162*>(dst + 128 * (kG0 + mb / 2) + 16 * (mb % 2)) = p;
          }
        } else {
          float* dst = o_accum + ((static_cast<long long>(split) * h_kv + kvh) * rows + r) * kDV + ch0;
#pragma unroll
          for (int mb = 0; mb < 2 * kNG; ++mb)
            *reinterpret_cast<float2*>(dst + 128 * (kG0 + mb / 2) + 16 * (mb % 2)) =
                make_float2(o[mb][4 * j + e] * inv, o[mb][4 * j + 2 + e] * inv);
        }
      }
  }
