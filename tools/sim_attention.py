"""Lane-level simulation of kernels/attention.cu (forward + backward) in numpy, checked against
a naive f64 reference of the pair-masked attention; the check that was possible without a GPU.

    /tmp/refenv/bin/python tools/sim_attention.py [seed]   # any python with numpy

It mirrors the kernel's index arithmetic by hand (flat shared-memory offsets with the row
padding, the per-lane mma.m16n8k16 fragment layouts of the PTX ISA, the quad shuffles, the
online softmax in the exp2 domain, the tile-skip test, GQA head mapping, the dS tile and the
dQ split across warps), with padding initialised to NaN so a read of it shows. It checks
the algorithm and the indexing, not bf16 precision, races or speed; keep it in step with
kernels/attention.cu when that changes (tests/gpu.rs is the real check, on a GPU)."""
import numpy as np, math, sys

PAD = 8
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

def mma(d, a, b):
    """d: [32][4] f64, a: [32][4] pairs, b: [32][2] pairs (each a (lo, hi) tuple)."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, 2*t:2*t+2] = a[lane][0]; A[g+8, 2*t:2*t+2] = a[lane][1]
        A[g, 2*t+8:2*t+10] = a[lane][2]; A[g+8, 2*t+8:2*t+10] = a[lane][3]
        B[2*t:2*t+2, g] = b[lane][0]; B[2*t+8:2*t+10, g] = b[lane][1]
        C[g, 2*t:2*t+2] = d[lane][0:2]; C[g+8, 2*t:2*t+2] = d[lane][2:4]
    D = A @ B + C
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        d[lane][0:2] = D[g, 2*t:2*t+2]; d[lane][2:4] = D[g+8, 2*t:2*t+2]

def meta(group, branch, t, n):
    return int(group[t]) * 4 + int(branch[t]) if t < n else -1

def visible(qm, km, q, k):
    return qm >= 0 and km >= 0 and k <= q and (qm >> 2) == (km >> 2) and ((km & 3) == 0 or (km & 3) == (qm & 3))

def load_rows(D, ROWS, src, col0, stride_unused, row0, n):
    """src: 2D [n, cols]; returns flat smem of ROWS*(D+PAD), rows >= n zero."""
    LD = D + PAD
    dst = np.full(ROWS * LD, np.nan)  # padding stays NaN: reading it would poison results
    for r in range(ROWS):
        for c in range(D):
            dst[r*LD + c] = src[row0 + r, col0 + c] if row0 + r < n else 0.0
    return dst

def lds32(s, off):
    return (s[off], s[off + 1])

def pack(a, b):
    return (a, b)

def forward(q, k, v, group, branch, gs, nh, nkv, D):
    n = q.shape[0]; BM = BN = 64; LD = D + PAD
    o = np.full((n, nh * D), np.nan); lse = np.full((n, nh), np.nan)
    scale = 1 / math.sqrt(D); sl2 = scale * LOG2E
    skipped = 0
    for h in range(nh):
        kvh = h // (nh // nkv)
        for bx in range((n + BM - 1) // BM):
            q0 = bx * BM
            Ks = load_rows(D, BM, q, h * D, None, q0, n)
            qmeta = [meta(group, branch, q0 + i, n) for i in range(BM)]
            W = []
            for warp in range(4):
                wr = warp * 16
                st = {'qf': [], 'acc': [[[0.0]*4 for _ in range(32)] for _ in range(D // 8)],
                      'm0': [-np.inf]*32, 'm1': [-np.inf]*32, 'l0': [0.0]*32, 'l1': [0.0]*32}
                for kk in range(D // 16):
                    frag = []
                    for lane in range(32):
                        g, t4 = lane >> 2, lane & 3
                        base = (wr + g) * LD + kk * 16 + 2 * t4
                        frag.append((lds32(Ks, base), lds32(Ks, base + 8 * LD), lds32(Ks, base + 8), lds32(Ks, base + 8 * LD + 8)))
                    st['qf'].append(frag)
                W.append(st)
            k_begin = int(gs[group[q0]])
            k_end = min(q0 + BM, n)
            kb = k_begin // BN * BN
            while kb < k_end:
                Ks = load_rows(D, BN, k, kvh * D, None, kb, n)
                Vs = load_rows(D, BN, v, kvh * D, None, kb, n)
                kmeta = [meta(group, branch, kb + i, n) for i in range(BN)]
                anyv = False
                for tid in range(128):
                    qi = tid & (BM - 1); kh = (tid // BM) * 32
                    for j in range(32):
                        if visible(qmeta[qi], kmeta[kh + j], q0 + qi, kb + kh + j):
                            anyv = True; break
                if not anyv:
                    skipped += 1
                    kb += BN; continue
                for warp in range(4):
                    st = W[warp]; wr = warp * 16
                    s = [[[0.0]*4 for _ in range(32)] for _ in range(BN // 8)]
                    for j in range(BN // 8):
                        for kk in range(D // 16):
                            b = []
                            for lane in range(32):
                                g, t4 = lane >> 2, lane & 3
                                base = (j * 8 + g) * LD + kk * 16 + 2 * t4
                                b.append((lds32(Ks, base), lds32(Ks, base + 8)))
                            mma(s[j], st['qf'][kk], b)
                    # per lane softmax bits
                    mx0 = [-np.inf]*32; mx1 = [-np.inf]*32
                    for lane in range(32):
                        g, t4 = lane >> 2, lane & 3
                        r0 = q0 + wr + g; r1 = r0 + 8
                        qm0, qm1 = qmeta[wr + g], qmeta[wr + g + 8]
                        for j in range(BN // 8):
                            for e in range(4):
                                kc = j * 8 + 2 * t4 + (e & 1)
                                vis = visible(qm0, kmeta[kc], r0, kb + kc) if e < 2 else visible(qm1, kmeta[kc], r1, kb + kc)
                                s[j][lane][e] = s[j][lane][e] * sl2 if vis else -np.inf
                            mx0[lane] = max(mx0[lane], s[j][lane][0], s[j][lane][1])
                            mx1[lane] = max(mx1[lane], s[j][lane][2], s[j][lane][3])
                    # shfl_xor 1, 2 within quads
                    for arr in (mx0, mx1):
                        for off in (1, 2):
                            new = [max(arr[l], arr[l ^ off]) for l in range(32)]
                            arr[:] = new
                    for lane in range(32):
                        mn0 = max(st['m0'][lane], mx0[lane]); mn1 = max(st['m1'][lane], mx1[lane])
                        b0 = 0.0 if mn0 == -np.inf else mn0; b1 = 0.0 if mn1 == -np.inf else mn1
                        al0 = 2 ** (st['m0'][lane] - b0); al1 = 2 ** (st['m1'][lane] - b1)
                        st['m0'][lane] = mn0; st['m1'][lane] = mn1
                        ps0 = ps1 = 0.0
                        for j in range(BN // 8):
                            s[j][lane][0] = 2 ** (s[j][lane][0] - b0); s[j][lane][1] = 2 ** (s[j][lane][1] - b0)
                            s[j][lane][2] = 2 ** (s[j][lane][2] - b1); s[j][lane][3] = 2 ** (s[j][lane][3] - b1)
                            ps0 += s[j][lane][0] + s[j][lane][1]; ps1 += s[j][lane][2] + s[j][lane][3]
                        st['l0'][lane] = st['l0'][lane] * al0 + ps0
                        st['l1'][lane] = st['l1'][lane] * al1 + ps1
                        for j in range(D // 8):
                            st['acc'][j][lane][0] *= al0; st['acc'][j][lane][1] *= al0
                            st['acc'][j][lane][2] *= al1; st['acc'][j][lane][3] *= al1
                    for kk in range(BN // 16):
                        a = [(pack(s[2*kk][l][0], s[2*kk][l][1]), pack(s[2*kk][l][2], s[2*kk][l][3]),
                              pack(s[2*kk+1][l][0], s[2*kk+1][l][1]), pack(s[2*kk+1][l][2], s[2*kk+1][l][3])) for l in range(32)]
                        for j in range(D // 8):
                            b = []
                            for lane in range(32):
                                g, t4 = lane >> 2, lane & 3
                                p = (kk * 16 + 2 * t4) * LD + g + j * 8
                                b.append((pack(Vs[p], Vs[p + LD]), pack(Vs[p + 8 * LD], Vs[p + 9 * LD])))
                            mma(st['acc'][j], a, b)
                kb += BN
            for warp in range(4):
                st = W[warp]; wr = warp * 16
                l0 = list(st['l0']); l1 = list(st['l1'])
                for arr in (l0, l1):
                    for off in (1, 2):
                        arr[:] = [arr[l] + arr[l ^ off] for l in range(32)]
                for lane in range(32):
                    g, t4 = lane >> 2, lane & 3
                    r0 = q0 + wr + g; r1 = r0 + 8
                    inv0 = 1 / l0[lane] if l0[lane] > 0 else 0; inv1 = 1 / l1[lane] if l1[lane] > 0 else 0
                    if r0 < n:
                        for j in range(D // 8):
                            c = h * D + 2 * t4 + j * 8
                            o[r0, c] = st['acc'][j][lane][0] * inv0; o[r0, c + 1] = st['acc'][j][lane][1] * inv0
                        if t4 == 0: lse[r0, h] = (st['m0'][lane] + math.log2(l0[lane])) * LN2
                    if r1 < n:
                        for j in range(D // 8):
                            c = h * D + 2 * t4 + j * 8
                            o[r1, c] = st['acc'][j][lane][2] * inv1; o[r1, c + 1] = st['acc'][j][lane][3] * inv1
                        if t4 == 0: lse[r1, h] = (st['m1'][lane] + math.log2(l1[lane])) * LN2
    return o, lse, skipped

def backward(dout, q, k, v, lse, delta, group, branch, gs, nh, nkv, D):
    n = q.shape[0]; BN, BM = 64, 32; LD = D + PAD; LDS = BN + PAD
    scale = 1 / math.sqrt(D); sl2 = scale * LOG2E
    dq = np.zeros((n, nh * D)); dk = np.full((n, nkv * D), np.nan); dv = np.full((n, nkv * D), np.nan)
    gsz = nh // nkv
    for kvh in range(nkv):
        for bx in range((n + BN - 1) // BN):
            k0 = bx * BN
            Ks = load_rows(D, BN, k, kvh * D, None, k0, n)
            Vs = load_rows(D, BN, v, kvh * D, None, k0, n)
            kmeta = [meta(group, branch, k0 + i, n) for i in range(BN)]
            dk_acc = [[[[0.0]*4 for _ in range(32)] for _ in range(D // 8)] for _ in range(4)]
            dv_acc = [[[[0.0]*4 for _ in range(32)] for _ in range(D // 8)] for _ in range(4)]
            k_last = min(k0 + BN, n) - 1
            q_end = int(gs[group[k_last] + 1])
            for h in range(kvh * gsz, (kvh + 1) * gsz):
                q0 = k0
                while q0 < q_end:
                    Qs = load_rows(D, BM, q, h * D, None, q0, n)
                    dOs = load_rows(D, BM, dout, h * D, None, q0, n)
                    qmeta = [meta(group, branch, q0 + i, n) for i in range(BM)]
                    lse_s = [lse[q0 + i, h] * LOG2E if q0 + i < n else 0 for i in range(BM)]
                    delta_s = [delta[q0 + i, h] if q0 + i < n else 0 for i in range(BM)]
                    anyv = False
                    for tid in range(128):
                        qi = tid & (BM - 1); kq = (tid // BM) * 16
                        for j in range(16):
                            if visible(qmeta[qi], kmeta[kq + j], q0 + qi, k0 + kq + j):
                                anyv = True; break
                    if not anyv:
                        q0 += BM; continue
                    dSs = np.full(BM * LDS, np.nan)
                    for warp in range(4):
                        wk = warp * 16
                        s = [[[0.0]*4 for _ in range(32)] for _ in range(BM // 8)]
                        dp = [[[0.0]*4 for _ in range(32)] for _ in range(BM // 8)]
                        for kk in range(D // 16):
                            af = []; vf = []
                            for lane in range(32):
                                g, t4 = lane >> 2, lane & 3
                                ka = (wk + g) * LD + kk * 16 + 2 * t4
                                af.append((lds32(Ks, ka), lds32(Ks, ka + 8 * LD), lds32(Ks, ka + 8), lds32(Ks, ka + 8 * LD + 8)))
                                vf.append((lds32(Vs, ka), lds32(Vs, ka + 8 * LD), lds32(Vs, ka + 8), lds32(Vs, ka + 8 * LD + 8)))
                            for j in range(BM // 8):
                                bq = []; bd = []
                                for lane in range(32):
                                    g, t4 = lane >> 2, lane & 3
                                    qb = (j * 8 + g) * LD + kk * 16 + 2 * t4
                                    bq.append((lds32(Qs, qb), lds32(Qs, qb + 8)))
                                    bd.append((lds32(dOs, qb), lds32(dOs, qb + 8)))
                                mma(s[j], af, bq); mma(dp[j], vf, bd)
                        for lane in range(32):
                            g, t4 = lane >> 2, lane & 3
                            kr0 = k0 + wk + g; kr1 = kr0 + 8
                            km0, km1 = kmeta[wk + g], kmeta[wk + g + 8]
                            for j in range(BM // 8):
                                for e in range(4):
                                    qc = j * 8 + 2 * t4 + (e & 1)
                                    vis = visible(qmeta[qc], km0, q0 + qc, kr0) if e < 2 else visible(qmeta[qc], km1, q0 + qc, kr1)
                                    p = 2 ** (s[j][lane][e] * sl2 - lse_s[qc]) if vis else 0.0
                                    s[j][lane][e] = p
                                    dp[j][lane][e] = p * (dp[j][lane][e] - delta_s[qc])
                        for kk in range(BM // 16):
                            ap = [(pack(s[2*kk][l][0], s[2*kk][l][1]), pack(s[2*kk][l][2], s[2*kk][l][3]),
                                   pack(s[2*kk+1][l][0], s[2*kk+1][l][1]), pack(s[2*kk+1][l][2], s[2*kk+1][l][3])) for l in range(32)]
                            as_ = [(pack(dp[2*kk][l][0], dp[2*kk][l][1]), pack(dp[2*kk][l][2], dp[2*kk][l][3]),
                                    pack(dp[2*kk+1][l][0], dp[2*kk+1][l][1]), pack(dp[2*kk+1][l][2], dp[2*kk+1][l][3])) for l in range(32)]
                            for j in range(D // 8):
                                bd = []; bq = []
                                for lane in range(32):
                                    g, t4 = lane >> 2, lane & 3
                                    p = (kk * 16 + 2 * t4) * LD + g + j * 8
                                    bd.append((pack(dOs[p], dOs[p + LD]), pack(dOs[p + 8 * LD], dOs[p + 9 * LD])))
                                    bq.append((pack(Qs[p], Qs[p + LD]), pack(Qs[p + 8 * LD], Qs[p + 9 * LD])))
                                mma(dv_acc[warp][j], ap, bd); mma(dk_acc[warp][j], as_, bq)
                        for lane in range(32):
                            g, t4 = lane >> 2, lane & 3
                            for j in range(BM // 8):
                                for e in range(4):
                                    qc = j * 8 + 2 * t4 + (e & 1); kc = wk + g + (8 if e >= 2 else 0)
                                    dSs[qc * LDS + kc] = dp[j][lane][e] * scale
                    for warp in range(4):
                        wq = (warp & 1) * 16; wd = (warp >> 1) * (D // 2)
                        dqa = [[[0.0]*4 for _ in range(32)] for _ in range(D // 16)]
                        for kk in range(BN // 16):
                            a = []
                            for lane in range(32):
                                g, t4 = lane >> 2, lane & 3
                                sa = (wq + g) * LDS + kk * 16 + 2 * t4
                                a.append((lds32(dSs, sa), lds32(dSs, sa + 8 * LDS), lds32(dSs, sa + 8), lds32(dSs, sa + 8 * LDS + 8)))
                            for j in range(D // 16):
                                b = []
                                for lane in range(32):
                                    g, t4 = lane >> 2, lane & 3
                                    p = (kk * 16 + 2 * t4) * LD + wd + g + j * 8
                                    b.append((pack(Ks[p], Ks[p + LD]), pack(Ks[p + 8 * LD], Ks[p + 9 * LD])))
                                mma(dqa[j], a, b)
                        for lane in range(32):
                            g, t4 = lane >> 2, lane & 3
                            qa = q0 + wq + g; qb = qa + 8
                            for j in range(D // 16):
                                c = h * D + wd + j * 8 + 2 * t4
                                if qa < n: dq[qa, c] += dqa[j][lane][0]; dq[qa, c + 1] += dqa[j][lane][1]
                                if qb < n: dq[qb, c] += dqa[j][lane][2]; dq[qb, c + 1] += dqa[j][lane][3]
                    q0 += BM
            for warp in range(4):
                wk = warp * 16
                for lane in range(32):
                    g, t4 = lane >> 2, lane & 3
                    kr0 = k0 + wk + g; kr1 = kr0 + 8
                    for j in range(D // 8):
                        c = kvh * D + j * 8 + 2 * t4
                        if kr0 < n:
                            dk[kr0, c:c+2] = np.array(dk_acc[warp][j][lane][0:2]) * scale; dv[kr0, c:c+2] = dv_acc[warp][j][lane][0:2]
                        if kr1 < n:
                            dk[kr1, c:c+2] = np.array(dk_acc[warp][j][lane][2:4]) * scale; dv[kr1, c:c+2] = dv_acc[warp][j][lane][2:4]
    return dq, dk, dv

def naive(q, k, v, dout, group, branch, nh, nkv, D):
    n = q.shape[0]; scale = 1 / math.sqrt(D)
    o = np.zeros((n, nh * D)); lse = np.zeros((n, nh))
    dq = np.zeros_like(q); dk = np.zeros_like(k); dv = np.zeros_like(v)
    for h in range(nh):
        g = h // (nh // nkv)
        Q = q[:, h*D:(h+1)*D]; K = k[:, g*D:(g+1)*D]; V = v[:, g*D:(g+1)*D]; dO = dout[:, h*D:(h+1)*D]
        M = np.array([[kk <= qq and group[kk] == group[qq] and (branch[kk] == 0 or branch[kk] == branch[qq]) for kk in range(n)] for qq in range(n)])
        S = np.where(M, Q @ K.T * scale, -np.inf)
        L = np.log(np.exp(S - S.max(1, keepdims=True)).sum(1)) + S.max(1)
        P = np.exp(S - L[:, None])
        O = P @ V
        o[:, h*D:(h+1)*D] = O; lse[:, h] = L
        dP = dO @ V.T; Dl = (dO * O).sum(1)
        dS = P * (dP - Dl[:, None])
        dq[:, h*D:(h+1)*D] += scale * dS @ K
        dk[:, g*D:(g+1)*D] += scale * dS.T @ Q
        dv[:, g*D:(g+1)*D] += P.T @ dO
    return o, lse, dq, dk, dv

def batch(rng, n_pairs, max_len, concat=False):
    group = []; branch = []; gs = [0]
    for p in range(n_pairs):
        pl, cl, rl = [1 + rng.integers(max_len) for _ in range(3)]
        if not concat:
            gi = len(gs) - 1
            group += [gi] * (pl + cl + rl); branch += [0] * pl + [1] * cl + [2] * rl; gs.append(len(group))
        else:
            for b, l in ((1, cl), (2, rl)):
                gi = len(gs) - 1
                group += [gi] * (pl + l); branch += [0] * pl + [b] * l; gs.append(len(group))
    return np.array(group), np.array(branch), np.array(gs)

if __name__ == "__main__":
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    # (pairs, max part length, concatenated layout, heads, kv heads, head dim)
    cases = [(2, 30, False, 2, 1, 16), (1, 50, False, 2, 2, 32), (3, 25, True, 4, 2, 16), (2, 60, False, 1, 1, 16), (1, 250, False, 2, 1, 16), (2, 200, False, 1, 1, 16), (1, 100, False, 1, 1, 64)]
    for (pairs, ml, concat, nh, nkv, D) in cases:
        group, branch, gs = batch(rng, pairs, ml, concat)
        n = len(group)
        q = rng.standard_normal((n, nh * D)); k = rng.standard_normal((n, nkv * D)); v = rng.standard_normal((n, nkv * D))
        dout = rng.standard_normal((n, nh * D))
        o_ref, lse_ref, dq_ref, dk_ref, dv_ref = naive(q, k, v, dout, group, branch, nh, nkv, D)
        o, lse, skipped = forward(q, k, v, group, branch, gs, nh, nkv, D)
        delta = np.stack([(dout[:, h*D:(h+1)*D] * o[:, h*D:(h+1)*D]).sum(1) for h in range(nh)], 1)
        dq, dk, dv = backward(dout, q, k, v, lse, delta, group, branch, gs, nh, nkv, D)
        err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
        assert max(err(o, o_ref), err(lse, lse_ref), err(dq, dq_ref), err(dk, dk_ref), err(dv, dv_ref)) < 1e-12
        print(f"n={n} pairs={pairs} concat={concat} h={nh}/{nkv} D={D} skipped_tiles={skipped}: "
              f"o {err(o, o_ref):.1e} lse {err(lse, lse_ref):.1e} dq {err(dq, dq_ref):.1e} dk {err(dk, dk_ref):.1e} dv {err(dv, dv_ref):.1e}",
              flush=True)

    # One pair whose chosen answer spans whole 64-key tiles: the rejected query tiles skip them.
    group = np.zeros(410, dtype=int); branch = np.array([0] * 10 + [1] * 300 + [2] * 100); gs = np.array([0, 410])
    q = rng.standard_normal((410, 16)); k = rng.standard_normal((410, 16)); v = rng.standard_normal((410, 16))
    dout = rng.standard_normal((410, 16))
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = naive(q, k, v, dout, group, branch, 1, 1, 16)
    o, lse, skipped = forward(q, k, v, group, branch, gs, 1, 1, 16)
    dq, dk, dv = backward(dout, q, k, v, lse, (dout * o).sum(1, keepdims=True), group, branch, gs, 1, 1, 16)
    assert skipped > 0, "no tile was skipped"
    worst = max(err(o, o_ref), err(lse, lse_ref), err(dq, dq_ref), err(dk, dk_ref), err(dv, dv_ref))
    print(f"long chosen answer: {skipped} key tiles skipped, worst relative error {worst:.1e}")
    assert worst < 1e-12
