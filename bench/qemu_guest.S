/*
 * The QEMU guest of bench/vs_qemu.py: a 64 KiB firmware (-bios) for QEMU's pc machine
 * under TCG, no kernel, no disk. It is the whole guest: it enters flat 32-bit protected
 * mode, programs the PIC and the PIT, and then, on every timer tick, increments one
 * byte in each of PER_TICK pages of [FIRST, LAST), a page at a time, wrapping
 * around (the counter sweep of QEMU's migration-test A-B guest and of trimig's
 * workload guest, at a set rate). Between ticks it halts, as an idle guest does, so its
 * vCPU thread sleeps. PER_TICK 0: an idle guest that only takes its ticks.
 *
 * bench/vs_qemu.py carries the assembled bytes (FIRMWARE_CODE) and patches the four
 * parameters at "params"; tests/test_bench_vs_qemu.py checks that they match this file
 * where binutils is installed. To rebuild:
 *
 *     as --32 -o guest.o bench/qemu_guest.S && objcopy -O binary -j .text guest.o guest.bin
 *
 * The image: this code at offset 0 (the CPU sees it at 0xf0000, the isa-bios alias of
 * the top 64 KiB), and at 0xfff0, the reset vector, "ljmp $0xf000, $0" (put there by
 * vs_qemu.py). Every address below is absolute (BASE + offset) so that the object has
 * no relocations and objcopy alone makes the binary.
 */
        .set BASE, 0xf0000
        .text
        .code16
start16:
        cli
        cld
        inb $0x92, %al                  /* fast A20 on (bit 0 is reset: keep it clear) */
        orb $2, %al
        andb $0xfe, %al
        outb %al, $0x92
        lgdtl %cs:(gdt_desc - start16)
        movl %cr0, %eax
        orl $1, %eax                    /* PE */
        movl %eax, %cr0
        ljmpl $0x08, $(BASE + start32 - start16)
        .code32
start32:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $0x80000, %esp             /* below 640 KiB, outside [FIRST, LAST) */
        lidt (BASE + idt_desc - start16)
        /* Local APIC in virtual-wire mode: enabled, LINT0 ExtINT (PIC), LINT1 NMI. */
        movl $0x1ff, 0xfee000f0
        movl $0x700, 0xfee00350
        movl $0x400, 0xfee00360
        /* PICs: ICW1..4, IRQ 0-7 at vectors 0x20-0x27, only IRQ0 (the PIT) unmasked. */
        movb $0x11, %al
        outb %al, $0x20
        outb %al, $0xa0
        movb $0x20, %al
        outb %al, $0x21
        movb $0x28, %al
        outb %al, $0xa1
        movb $0x04, %al
        outb %al, $0x21
        movb $0x02, %al
        outb %al, $0xa1
        movb $0x01, %al
        outb %al, $0x21
        outb %al, $0xa1
        movb $0xfe, %al
        outb %al, $0x21
        movb $0xff, %al
        outb %al, $0xa1
        /* PIT channel 0, mode 2 (rate generator), 1193182 Hz / DIVISOR. */
        movb $0x34, %al
        outb %al, $0x43
        movl (BASE + divisor - start16), %eax
        outb %al, $0x40
        movb %ah, %al
        outb %al, $0x40
        movl (BASE + first - start16), %esi
tick:
        sti
        hlt                             /* until the next tick (sti: no interrupt before it) */
        cli
        movl (BASE + per_tick - start16), %ecx
        testl %ecx, %ecx
        jz tick
dirty:
        incb (%esi)
        addl $4096, %esi
        cmpl (BASE + last - start16), %esi
        jb 1f
        movl (BASE + first - start16), %esi
1:      decl %ecx
        jnz dirty
        jmp tick
irq0:
        pushl %eax
        movb $0x20, %al                 /* EOI */
        outb %al, $0x20
        popl %eax
        iret
        .balign 8
gdt:
        .quad 0
        .quad 0x00cf9b000000ffff        /* 0x08: code, flat 4 GiB, 32-bit (accessed: ROM) */
        .quad 0x00cf93000000ffff        /* 0x10: data, flat 4 GiB */
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .long BASE + gdt - start16
        .balign 8
idt:
        .fill 0x20, 8, 0                /* no exception handlers: a fault resets the guest */
        .word (BASE + irq0 - start16) & 0xffff  /* 0x20: 32-bit interrupt gate to irq0 */
        .word 0x08
        .word 0x8e00
        .word (BASE + irq0 - start16) >> 16
idt_end:
idt_desc:
        .word idt_end - idt - 1
        .long BASE + idt - start16
        .balign 16
params:                                 /* offset 0x200, patched by vs_qemu.py */
first:    .long 0x100000                /* first page swept */
last:     .long 0x3c100000              /* end of the sweep (exclusive) */
per_tick: .long 0                       /* pages per tick (0: idle) */
divisor:  .long 1193                    /* PIT divisor: 1193 = 1000 Hz */
