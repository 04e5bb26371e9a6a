//go:build amd64 && !purego

#include "textflag.h"

// AVX2 merge kernels; see merge_amd64.go. Every multiply and add is a
// separate VMULPD/VADDPD, in the order of the Go code, so results are
// bitwise those of rankProduct and fusedRow.

// func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
TEXT ·cpuid(SB), NOSPLIT, $0-24
	MOVL eaxArg+0(FP), AX
	MOVL ecxArg+4(FP), CX
	CPUID
	MOVL AX, eax+8(FP)
	MOVL BX, ebx+12(FP)
	MOVL CX, ecx+16(FP)
	MOVL DX, edx+20(FP)
	RET

// func xgetbv() (eax, edx uint32)
TEXT ·xgetbv(SB), NOSPLIT, $0-8
	MOVL $0, CX
	XGETBV
	MOVL AX, eax+0(FP)
	MOVL DX, edx+4(FP)
	RET

// func rankProductAVX2(acc, urow, v []float64, stride int)
//
// For each block of 32 columns, eight accumulators of four lanes start at
// +0 and take urow[k]·v[k·stride+q] for k = 0, 1, ... in order.
TEXT ·rankProductAVX2(SB), NOSPLIT, $0-80
	MOVQ acc_base+0(FP), DI
	MOVQ acc_len+8(FP), CX
	MOVQ urow_base+24(FP), SI
	MOVQ urow_len+32(FP), R8
	MOVQ v_base+48(FP), DX
	MOVQ stride+72(FP), R9
	SHLQ $3, R9               // row stride of v in bytes
	XORQ AX, AX               // byte offset of the column block

block:
	CMPQ CX, $32
	JLT  done
	VXORPD Y0, Y0, Y0
	VXORPD Y1, Y1, Y1
	VXORPD Y2, Y2, Y2
	VXORPD Y3, Y3, Y3
	VXORPD Y4, Y4, Y4
	VXORPD Y5, Y5, Y5
	VXORPD Y6, Y6, Y6
	VXORPD Y7, Y7, Y7
	LEAQ (DX)(AX*1), R10      // &v[k·stride + q]
	XORQ R11, R11             // k

rank:
	CMPQ R11, R8
	JGE  store
	VBROADCASTSD (SI)(R11*8), Y15
	VMULPD (R10), Y15, Y8
	VMULPD 32(R10), Y15, Y9
	VMULPD 64(R10), Y15, Y10
	VMULPD 96(R10), Y15, Y11
	VADDPD Y8, Y0, Y0
	VADDPD Y9, Y1, Y1
	VADDPD Y10, Y2, Y2
	VADDPD Y11, Y3, Y3
	VMULPD 128(R10), Y15, Y8
	VMULPD 160(R10), Y15, Y9
	VMULPD 192(R10), Y15, Y10
	VMULPD 224(R10), Y15, Y11
	VADDPD Y8, Y4, Y4
	VADDPD Y9, Y5, Y5
	VADDPD Y10, Y6, Y6
	VADDPD Y11, Y7, Y7
	ADDQ R9, R10
	INCQ R11
	JMP  rank

store:
	VMOVUPD Y0, (DI)(AX*1)
	VMOVUPD Y1, 32(DI)(AX*1)
	VMOVUPD Y2, 64(DI)(AX*1)
	VMOVUPD Y3, 96(DI)(AX*1)
	VMOVUPD Y4, 128(DI)(AX*1)
	VMOVUPD Y5, 160(DI)(AX*1)
	VMOVUPD Y6, 192(DI)(AX*1)
	VMOVUPD Y7, 224(DI)(AX*1)
	ADDQ $256, AX
	SUBQ $32, CX
	JMP  block

done:
	VZEROUPPER
	RET

// Constants of the fused kernels, one quadword each (broadcast).
DATA absMask<>+0(SB)/8, $0x7fffffffffffffff
GLOBL absMask<>(SB), RODATA|NOPTR, $8
DATA one<>+0(SB)/8, $1
GLOBL one<>(SB), RODATA|NOPTR, $8
DATA signBit16<>+0(SB)/8, $0x8000
GLOBL signBit16<>(SB), RODATA|NOPTR, $8

// float16: normal results below the rounding bound of the largest half.
DATA f16Lo<>+0(SB)/8, $0x3f10000000000000    // 2^-14
GLOBL f16Lo<>(SB), RODATA|NOPTR, $8
DATA f16Hi<>+0(SB)/8, $0x40effe0000000000    // 65520: rounds to infinity
GLOBL f16Hi<>(SB), RODATA|NOPTR, $8
DATA f16Round<>+0(SB)/8, $0x1ffffffffff      // 2^41 - 1
GLOBL f16Round<>(SB), RODATA|NOPTR, $8
DATA f16Bias<>+0(SB)/8, $0xfc000             // (1023-15) << 10
GLOBL f16Bias<>(SB), RODATA|NOPTR, $8

// bfloat16: the same with 7 mantissa bits.
DATA bf16Lo<>+0(SB)/8, $0x3810000000000000   // 2^-126
GLOBL bf16Lo<>(SB), RODATA|NOPTR, $8
DATA bf16Hi<>+0(SB)/8, $0x47eff00000000000   // (2 - 2^-8)·2^127: rounds to infinity
GLOBL bf16Hi<>(SB), RODATA|NOPTR, $8
DATA bf16Round<>+0(SB)/8, $0xfffffffffff     // 2^44 - 1
GLOBL bf16Round<>(SB), RODATA|NOPTR, $8
DATA bf16Bias<>+0(SB)/8, $0x1c000            // (1023-127) << 7
GLOBL bf16Bias<>(SB), RODATA|NOPTR, $8

// float32 exponent mask, for counting infinities and NaNs.
DATA expMask32<>+0(SB)/4, $0x7f800000
GLOBL expMask32<>(SB), RODATA|NOPTR, $4
DATA absMask32<>+0(SB)/4, $0x7fffffff
GLOBL absMask32<>(SB), RODATA|NOPTR, $4

// Gathers the low 16 bits of each quadword: bytes 0,1 and 8,9 of each
// 128-bit lane.
DATA packWords<>+0(SB)/8, $0x8080808009080100
DATA packWords<>+8(SB)/8, $0x8080808080808080
DATA packWords<>+16(SB)/8, $0x8080808009080100
DATA packWords<>+24(SB)/8, $0x8080808080808080
GLOBL packWords<>(SB), RODATA|NOPTR, $32

// The float16 and bfloat16 kernels share everything but how four stored
// values become four doubles (DECODE_*, into Y1) and the rounding
// constants: the result's bits are rounded to nearest even by adding
// ROUND plus the lowest kept bit, shifted right by SHIFT (42 or 45) and
// re-biased by BIAS. A group with any value outside [lo, hi) (zero,
// subnormal, overflowing, NaN) ends the kernel; the Go code does it.
//
// Registers: DI drow, SI srow, DX acc, CX end of the last whole group,
// AX index, R8 unchanged count, R12 stats; Y15 coef, Y14 abs mask, Y13
// max |delta|, Y12 lo, Y11 hi, Y10 round, Y9 bias, Y8 sign bit, Y7 pack
// mask, Y6 one.

#define FUSED16_SETUP \
	MOVQ drow_base+0(FP), DI \
	MOVQ srow_base+24(FP), SI \
	MOVQ acc_base+48(FP), DX \
	MOVQ acc_len+56(FP), CX \
	ANDQ $~3, CX \
	MOVQ st+80(FP), R12 \
	VBROADCASTSD coef+72(FP), Y15 \
	VPBROADCASTQ absMask<>(SB), Y14 \
	VMOVUPD (R12), Y13 \
	VPBROADCASTQ signBit16<>(SB), Y8 \
	VMOVDQU packWords<>(SB), Y7 \
	VPBROADCASTQ one<>(SB), Y6 \
	XORQ AX, AX \
	XORQ R8, R8

// Four halves to doubles, exactly (F16C).
#define DECODE_F16 \
	VCVTPH2PS (SI)(AX*2), X1 \
	VCVTPS2PD X1, Y1

// Four bfloat16 to doubles: the top halves of float32s.
#define DECODE_BF16 \
	VPMOVZXWD (SI)(AX*2), X1 \
	VPSLLD $16, X1, X1 \
	VCVTPS2PD X1, Y1

// d = coef·acc; x = w + d; jump to done unless lo <= |x| < hi.
#define FUSED16_ADD_CHECK(done) \
	VMULPD (DX)(AX*8), Y15, Y2 \
	VADDPD Y2, Y1, Y1 \
	VANDPD Y14, Y1, Y4 \
	VPCMPGTQ Y4, Y12, Y3 \
	VPCMPGTQ Y4, Y11, Y5 \
	VPANDN Y5, Y3, Y3 \
	VMOVMSKPD Y3, BX \
	CMPQ BX, $15 \
	JNE  done

// Track max |d| (a NaN |d| keeps the max), round, encode, count the
// unchanged values and store four 16-bit results.
#define FUSED16_STORE(SHIFT) \
	VANDPD Y14, Y2, Y3 \
	VMAXPD Y13, Y3, Y13 \
	VPSRLQ $SHIFT, Y4, Y3 \
	VPAND Y6, Y3, Y3 \
	VPADDQ Y10, Y4, Y4 \
	VPADDQ Y3, Y4, Y4 \
	VPSRLQ $SHIFT, Y4, Y4 \
	VPSUBQ Y9, Y4, Y4 \
	VPSRLQ $48, Y1, Y3 \
	VPAND Y8, Y3, Y3 \
	VPOR Y3, Y4, Y4 \
	VPMOVZXWQ (SI)(AX*2), Y0 \
	VPCMPEQQ Y0, Y4, Y3 \
	VMOVMSKPD Y3, BX \
	POPCNTL BX, BX \
	ADDQ BX, R8 \
	VPSHUFB Y7, Y4, Y4 \
	VEXTRACTI128 $1, Y4, X3 \
	VPUNPCKLDQ X3, X4, X4 \
	VMOVQ X4, (DI)(AX*2) \
	ADDQ $4, AX

#define FUSED16_FINISH \
	VMOVUPD Y13, (R12) \
	ADDQ R8, 32(R12) \
	MOVQ AX, ret+88(FP) \
	VZEROUPPER \
	RET

// func fusedF16AVX2(drow, srow []byte, acc []float64, coef float64, st *simdStats) int
TEXT ·fusedF16AVX2(SB), NOSPLIT, $0-96
	VPBROADCASTQ f16Lo<>(SB), Y12
	VPBROADCASTQ f16Hi<>(SB), Y11
	VPBROADCASTQ f16Round<>(SB), Y10
	VPBROADCASTQ f16Bias<>(SB), Y9
	FUSED16_SETUP

loop16:
	CMPQ AX, CX
	JGE  done16
	DECODE_F16
	FUSED16_ADD_CHECK(done16)
	FUSED16_STORE(42)
	JMP  loop16

done16:
	FUSED16_FINISH

// func fusedBF16AVX2(drow, srow []byte, acc []float64, coef float64, st *simdStats) int
TEXT ·fusedBF16AVX2(SB), NOSPLIT, $0-96
	VPBROADCASTQ bf16Lo<>(SB), Y12
	VPBROADCASTQ bf16Hi<>(SB), Y11
	VPBROADCASTQ bf16Round<>(SB), Y10
	VPBROADCASTQ bf16Bias<>(SB), Y9
	FUSED16_SETUP

loopbf:
	CMPQ AX, CX
	JGE  donebf
	DECODE_BF16
	FUSED16_ADD_CHECK(donebf)
	FUSED16_STORE(45)
	JMP  loopbf

donebf:
	FUSED16_FINISH

// func fusedF32AVX2(drow, srow []byte, acc []float64, coef float64, st *simdStats) int
//
// float32 needs no range check: VCVTPD2PS rounds to nearest even like Go's
// float32(x), infinities included; they are counted.
TEXT ·fusedF32AVX2(SB), NOSPLIT, $0-96
	MOVQ drow_base+0(FP), DI
	MOVQ srow_base+24(FP), SI
	MOVQ acc_base+48(FP), DX
	MOVQ acc_len+56(FP), CX
	ANDQ $~3, CX
	MOVQ st+80(FP), R12
	VBROADCASTSD coef+72(FP), Y15
	VPBROADCASTQ absMask<>(SB), Y14
	VMOVUPD (R12), Y13
	VPBROADCASTD expMask32<>(SB), X12
	VPBROADCASTD absMask32<>(SB), X11
	VPXOR X10, X10, X10
	XORQ AX, AX
	XORQ R8, R8
	XORQ R9, R9

loop32:
	CMPQ AX, CX
	JGE  done32
	VCVTPS2PD (SI)(AX*4), Y1
	VMULPD (DX)(AX*8), Y15, Y2
	VADDPD Y2, Y1, Y1
	VANDPD Y14, Y2, Y3
	VMAXPD Y13, Y3, Y13
	VCVTPD2PSY Y1, X4
	VMOVUPS X4, (DI)(AX*4)
	VPCMPEQD (SI)(AX*4), X4, X3
	VPOR (SI)(AX*4), X4, X5   // zeros of either sign count as equal
	VPAND X11, X5, X5
	VPCMPEQD X10, X5, X5
	VPOR X5, X3, X3
	VMOVMSKPS X3, BX
	POPCNTL BX, BX
	ADDQ BX, R8
	VPAND X12, X4, X3
	VPCMPEQD X12, X3, X3
	VMOVMSKPS X3, BX
	POPCNTL BX, BX
	ADDQ BX, R9
	ADDQ $4, AX
	JMP  loop32

done32:
	VMOVUPD Y13, (R12)
	ADDQ R8, 32(R12)
	ADDQ R9, 40(R12)
	MOVQ AX, ret+88(FP)
	VZEROUPPER
	RET
