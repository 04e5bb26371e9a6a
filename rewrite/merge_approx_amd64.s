//go:build amd64 && !purego

#include "textflag.h"

// The certified float32 kernels of merge_approx_amd64.go (AVX2, FMA, F16C).

// func rankApproxAVX2(acc, urow, v []float32, stride int)
//
// acc[q] = Σk urow[k]·v[k·stride+q] with FMAs, for len(acc) a multiple of
// 8: blocks of 64 columns (eight chains, enough to hide the FMA latency),
// then of 8. len(urow) >= 1.
TEXT ·rankApproxAVX2(SB), NOSPLIT, $0-80
	MOVQ acc_base+0(FP), DI
	MOVQ acc_len+8(FP), CX
	MOVQ urow_base+24(FP), SI
	MOVQ urow_len+32(FP), R8
	MOVQ v_base+48(FP), DX
	MOVQ stride+72(FP), R9
	SHLQ $2, R9
	XORQ AX, AX

block64:
	CMPQ CX, $64
	JLT  block8
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	LEAQ (DX)(AX*1), R10
	XORQ R11, R11

rank64:
	VBROADCASTSS (SI)(R11*4), Y15
	VFMADD231PS (R10), Y15, Y0
	VFMADD231PS 32(R10), Y15, Y1
	VFMADD231PS 64(R10), Y15, Y2
	VFMADD231PS 96(R10), Y15, Y3
	VFMADD231PS 128(R10), Y15, Y4
	VFMADD231PS 160(R10), Y15, Y5
	VFMADD231PS 192(R10), Y15, Y6
	VFMADD231PS 224(R10), Y15, Y7
	ADDQ R9, R10
	INCQ R11
	CMPQ R11, R8
	JLT  rank64
	VMOVUPS Y0, (DI)(AX*1)
	VMOVUPS Y1, 32(DI)(AX*1)
	VMOVUPS Y2, 64(DI)(AX*1)
	VMOVUPS Y3, 96(DI)(AX*1)
	VMOVUPS Y4, 128(DI)(AX*1)
	VMOVUPS Y5, 160(DI)(AX*1)
	VMOVUPS Y6, 192(DI)(AX*1)
	VMOVUPS Y7, 224(DI)(AX*1)
	ADDQ $256, AX
	SUBQ $64, CX
	JMP  block64

block8:
	CMPQ CX, $8
	JLT  done
	VXORPS Y0, Y0, Y0
	LEAQ (DX)(AX*1), R10
	XORQ R11, R11

rank8:
	VBROADCASTSS (SI)(R11*4), Y15
	VFMADD231PS (R10), Y15, Y0
	ADDQ R9, R10
	INCQ R11
	CMPQ R11, R8
	JLT  rank8
	VMOVUPS Y0, (DI)(AX*1)
	ADDQ $32, AX
	SUBQ $8, CX
	JMP  block8

done:
	VZEROUPPER
	RET

DATA absMaskPS<>+0(SB)/4, $0x7fffffff
GLOBL absMaskPS<>(SB), RODATA|NOPTR, $4
DATA low15W<>+0(SB)/2, $0x7fff
GLOBL low15W<>(SB), RODATA|NOPTR, $2
DATA expF16W<>+0(SB)/2, $0x7c00
GLOBL expF16W<>(SB), RODATA|NOPTR, $2
DATA expBF16W<>+0(SB)/2, $0x7f80
GLOBL expBF16W<>(SB), RODATA|NOPTR, $2
DATA roundBF<>+0(SB)/4, $0x7fff
GLOBL roundBF<>(SB), RODATA|NOPTR, $4
DATA oneD<>+0(SB)/4, $1
GLOBL oneD<>(SB), RODATA|NOPTR, $4

// The certify kernels, per group of eight: â (acc), the bound E = cu·ca
// of |â - exact|, the stored value w, S = coef·â + w and its error width W
// = k1·(E + c3·|â|) + c4·|w|; the exact result lies in [S-W, S+W], so a
// lane whose two ends round to the same finite non-zero value has that
// result. A lane passes also only if k1·(|â|+E) <= m, so it cannot raise
// the maximum |delta|. Every lane's rounding of S-W is stored; a byte per
// group in masks says which lanes failed (Go computes them exactly).
//
// Registers: DI drow, SI srow, DX acc, R13 ca, R14 masks, CX groups, R11
// group, AX element, R8 equal passing lanes, R9 passing lanes; Y15 coef,
// Y14 k1, Y13 cu, Y12 m, Y11 float32 abs mask, Y10 c3, Y9 c4; X8 0x7fff,
// X7 the type's exponent mask (words).

// approxRow's layout: coef, k1, cu, m, c3, c4 (float32).
#define CERT_SETUP(EXPMASK) \
	MOVQ drow_base+0(FP), DI \
	MOVQ srow_base+24(FP), SI \
	MOVQ acc_base+48(FP), DX \
	MOVQ acc_len+56(FP), CX \
	SHRQ $3, CX \
	MOVQ ca_base+72(FP), R13 \
	MOVQ prm+96(FP), R12 \
	MOVQ masks_base+104(FP), R14 \
	VBROADCASTSS 0(R12), Y15 \
	VBROADCASTSS 4(R12), Y14 \
	VBROADCASTSS 8(R12), Y13 \
	VBROADCASTSS 12(R12), Y12 \
	VBROADCASTSS 16(R12), Y10 \
	VBROADCASTSS 20(R12), Y9 \
	VBROADCASTSS absMaskPS<>(SB), Y11 \
	VPBROADCASTW low15W<>(SB), X8 \
	VPBROADCASTW EXPMASK(SB), X7 \
	XORQ AX, AX \
	XORQ R11, R11 \
	XORQ R8, R8 \
	XORQ R9, R9

// Y3 = S+W, Y5 = S-W and Y4 = the maximum check (dwords) for the group
// at AX, whose stored values are decoded into Y2 by DECODE.
#define CERT_BOUNDS(DECODE) \
	VMOVUPS (DX)(AX*4), Y0 \
	VMULPS (R13)(AX*4), Y13, Y1 \
	DECODE \
	VMOVAPS Y2, Y3 \
	VFMADD231PS Y0, Y15, Y3 \
	VANDPS Y11, Y0, Y4 \
	VANDPS Y11, Y2, Y2 \
	VMULPS Y9, Y2, Y2 \
	VMOVAPS Y1, Y5 \
	VFMADD231PS Y4, Y10, Y5 \
	VFMADD231PS Y5, Y14, Y2 \
	VADDPS Y1, Y4, Y4 \
	VMULPS Y14, Y4, Y4 \
	VCMPPS $2, Y12, Y4, Y4 \
	VSUBPS Y2, Y3, Y5 \
	VADDPS Y2, Y3, Y3

// With the two ends rounded into X5 (low) and X3 (high), words: store X5,
// count and record the lanes.
#define CERT_FINISH \
	VPCMPEQW X5, X3, X3 \
	VEXTRACTF128 $1, Y4, X6 \
	VPACKSSDW X6, X4, X4 \
	VPAND X4, X3, X3 \
	VPAND X8, X5, X6 \
	VPCMPGTW X6, X7, X4 \
	VPAND X4, X3, X3 \
	VPXOR X4, X4, X4 \
	VPCMPEQW X4, X6, X6 \
	VPANDN X3, X6, X3 \
	VMOVDQU X5, (DI)(AX*2) \
	VMOVDQU (SI)(AX*2), X6 \
	VPCMPEQW X6, X5, X6 \
	VPAND X3, X6, X6 \
	VPACKSSWB X6, X6, X6 \
	VPMOVMSKB X6, BX \
	ANDL $0xff, BX \
	POPCNTL BX, BX \
	ADDQ BX, R8 \
	VPACKSSWB X3, X3, X3 \
	VPMOVMSKB X3, BX \
	ANDL $0xff, BX \
	MOVL BX, R10 \
	POPCNTL BX, BX \
	ADDQ BX, R9 \
	XORL $0xff, R10 \
	MOVB R10, (R14)(R11*1) \
	ADDQ $8, AX \
	INCQ R11

#define CERT_RET \
	MOVQ st+128(FP), R12 \
	MOVQ R9, 0(R12) \
	MOVQ R8, 8(R12) \
	VZEROUPPER \
	RET

#define DECODE_F16 VCVTPH2PS (SI)(AX*2), Y2

#define DECODE_BF16 \
	VPMOVZXWD (SI)(AX*2), Y2 \
	VPSLLD $16, Y2, Y2

// func certF16AVX2(drow, srow []byte, acc, ca []float32, prm *approxRow, masks []byte, st *certStats)
TEXT ·certF16AVX2(SB), NOSPLIT, $0-136
	CERT_SETUP(expF16W<>)

loopf16:
	CMPQ R11, CX
	JGE  donef16
	CERT_BOUNDS(DECODE_F16)
	VCVTPS2PH $0, Y5, X5
	VCVTPS2PH $0, Y3, X3
	CERT_FINISH
	JMP  loopf16

donef16:
	CERT_RET

// Rounds the float32 lanes of Y to bfloat16 (nearest even, finite values)
// in the low words of its dwords, packed into X: Y0 holds 1s, Y1 0x7fff.
#define ROUND_BF16(Y, X, T, TX) \
	VPSRLD $16, Y, T \
	VPAND Y0, T, T \
	VPADDD Y1, Y, Y \
	VPADDD T, Y, Y \
	VPSRLD $16, Y, Y \
	VEXTRACTI128 $1, Y, TX \
	VPACKUSDW TX, X, X

// func certBF16AVX2(drow, srow []byte, acc, ca []float32, prm *approxRow, masks []byte, st *certStats)
TEXT ·certBF16AVX2(SB), NOSPLIT, $0-136
	CERT_SETUP(expBF16W<>)

loopbf16:
	CMPQ R11, CX
	JGE  donebf16
	CERT_BOUNDS(DECODE_BF16)
	VPBROADCASTD oneD<>(SB), Y0
	VPBROADCASTD roundBF<>(SB), Y1
	ROUND_BF16(Y5, X5, Y2, X2)
	ROUND_BF16(Y3, X3, Y2, X2)
	CERT_FINISH
	JMP  loopbf16

donebf16:
	CERT_RET
