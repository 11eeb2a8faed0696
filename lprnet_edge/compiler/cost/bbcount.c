/*
 * bbcount: a qemu TCG plugin that counts how often each translated block executes inside
 * the guest's measured region, and records the block's instructions.
 *
 * The guest marks the region with getppid(MAGIC, 1) / getppid(MAGIC, 2) (see
 * lprnet_edge/runtime/cost_marker.py). At the start mark every counter is snapshotted; at
 * the stop mark the difference is added to the block's total, so start-up, imports and model
 * loading are not counted. Blocks are keyed by (vaddr, size, disassembly): qemu may translate
 * the same code again, the same address can start blocks of different lengths, and code
 * loaded where other code was unloaded must not inherit its instructions.
 *
 * getppid(MAGIC, 3, ID) dumps what the regions counted since the last dump as one section
 * "region ID" of the dump file and clears the totals: one process measures many programs
 * (tuning candidates), each in its own region, paying qemu's start-up once.
 *
 * Arguments: out=PATH (the report), nr=N (the getppid syscall number of the guest),
 * dump=PATH (optional: where sections go, appended and flushed at each dump).
 * Report (text): header lines, then per block executed in the region
 *   B <vaddr hex> <bytes> <instructions> <executions>
 *   I <disassembly>          (one per instruction)
 * A dump section is the same with a "region ID" header line, closed by a line "end".
 * The counters are inline adds (not atomic): the measured program runs one thread.
 */
#include <glib.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAGIC 0x4C50524EULL

typedef struct {
    uint64_t vaddr;
    uint64_t size;
    guint text; /* hash of the disassembly */
} BlockKey;

typedef struct {
    BlockKey key;
    uint32_t n_insns;
    char **disas;
    uint64_t count; /* executions since start of the process (inline counter) */
    uint64_t base;  /* count at the last start mark */
    uint64_t total; /* executions inside the measured region(s) */
} Block;

static GHashTable *blocks;
static GMutex lock;
static char *out_path;
static FILE *dump_file;
static int64_t marker_nr = -1;
static int in_region;
static int regions;

static guint key_hash(gconstpointer p)
{
    const BlockKey *k = p;
    return g_int64_hash(&k->vaddr) ^ (guint)(k->size * 2654435761u) ^ k->text;
}

static gboolean key_equal(gconstpointer a, gconstpointer b)
{
    const BlockKey *x = a, *y = b;
    return x->vaddr == y->vaddr && x->size == y->size && x->text == y->text;
}

static Block *block_for(struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    BlockKey key = {qemu_plugin_tb_vaddr(tb), 0, 5381};
    char **disas = g_new0(char *, n + 1);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        key.size += qemu_plugin_insn_size(insn);
        disas[i] = qemu_plugin_insn_disas(insn);
        key.text = key.text * 33u + (disas[i] ? g_str_hash(disas[i]) : 0u);
    }
    Block *b = g_hash_table_lookup(blocks, &key);
    if (b) {
        g_strfreev(disas);
        return b;
    }
    b = g_new0(Block, 1);
    b->key = key;
    b->n_insns = (uint32_t)n;
    b->disas = disas;
    g_hash_table_insert(blocks, &b->key, b);
    return b;
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    g_mutex_lock(&lock);
    Block *b = block_for(tb);
    g_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->count, 1);
}

static void mark(int start)
{
    GHashTableIter it;
    gpointer k, v;
    g_mutex_lock(&lock);
    g_hash_table_iter_init(&it, blocks);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        Block *b = v;
        if (start) {
            b->base = b->count;
        } else {
            b->total += b->count - b->base;
        }
    }
    if (start) {
        in_region = 1;
    } else {
        in_region = 0;
        regions++;
    }
    g_mutex_unlock(&lock);
}

static void write_blocks(FILE *f, GPtrArray *hit)
{
    for (guint i = 0; i < hit->len; i++) {
        Block *b = g_ptr_array_index(hit, i);
        fprintf(f, "B %" PRIx64 " %" PRIu64 " %u %" PRIu64 "\n", b->key.vaddr, b->key.size,
                b->n_insns, b->total);
        for (uint32_t j = 0; j < b->n_insns; j++) {
            fprintf(f, "I %s\n", b->disas[j] ? b->disas[j] : "?");
        }
    }
}

static gint by_vaddr(gconstpointer a, gconstpointer b);

/* The blocks counted so far (sorted), with their instruction and execution totals. */
static GPtrArray *counted(uint64_t *insns, uint64_t *execs)
{
    GPtrArray *hit = g_ptr_array_new();
    GHashTableIter it;
    gpointer k, v;
    *insns = *execs = 0;
    g_hash_table_iter_init(&it, blocks);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        Block *b = v;
        if (b->total) {
            g_ptr_array_add(hit, b);
            *insns += b->total * b->n_insns;
            *execs += b->total;
        }
    }
    g_ptr_array_sort(hit, by_vaddr);
    return hit;
}

static void dump(uint64_t id)
{
    uint64_t insns, execs;
    g_mutex_lock(&lock);
    if (dump_file) {
        GPtrArray *hit = counted(&insns, &execs);
        fprintf(dump_file, "bbcount 1\nregion %" PRIu64 "\nregions %d\nunclosed %d\n", id,
                regions, in_region);
        fprintf(dump_file, "instructions %" PRIu64 "\nexecutions %" PRIu64 "\nblocks %u\n",
                insns, execs, hit->len);
        write_blocks(dump_file, hit);
        fprintf(dump_file, "end\n");
        fflush(dump_file);
        for (guint i = 0; i < hit->len; i++) {
            ((Block *)g_ptr_array_index(hit, i))->total = 0;
        }
        g_ptr_array_free(hit, TRUE);
        regions = 0;
    }
    g_mutex_unlock(&lock);
}

static void vcpu_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                         uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                         uint64_t a7, uint64_t a8)
{
    if (num != marker_nr || a1 != MAGIC) {
        return;
    }
    if (a2 == 1 && !in_region) {
        mark(1);
    } else if (a2 == 2 && in_region) {
        mark(0);
    } else if (a2 == 3 && !in_region) {
        dump(a3);
    }
}

static gint by_vaddr(gconstpointer a, gconstpointer b)
{
    const Block *x = *(Block *const *)a, *y = *(Block *const *)b;
    if (x->key.vaddr != y->key.vaddr) {
        return x->key.vaddr < y->key.vaddr ? -1 : 1;
    }
    return x->key.size < y->key.size ? -1 : (x->key.size > y->key.size);
}

static void plugin_exit(qemu_plugin_id_t id, void *p)
{
    uint64_t insns, execs;
    g_mutex_lock(&lock);
    GPtrArray *hit = counted(&insns, &execs);
    FILE *f = fopen(out_path, "w");
    if (!f) {
        fprintf(stderr, "bbcount: cannot write %s\n", out_path);
        g_ptr_array_free(hit, TRUE);
        g_mutex_unlock(&lock);
        return;
    }
    fprintf(f, "bbcount 1\nregions %d\nunclosed %d\n", regions, in_region);
    fprintf(f, "instructions %" PRIu64 "\nexecutions %" PRIu64 "\nblocks %u\n", insns, execs,
            hit->len);
    write_blocks(f, hit);
    fclose(f);
    if (dump_file) {
        fclose(dump_file);
        dump_file = NULL;
    }
    g_ptr_array_free(hit, TRUE);
    g_mutex_unlock(&lock);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (g_str_has_prefix(argv[i], "out=")) {
            out_path = g_strdup(argv[i] + 4);
        } else if (g_str_has_prefix(argv[i], "dump=")) {
            dump_file = fopen(argv[i] + 5, "a");
            if (!dump_file) {
                fprintf(stderr, "bbcount: cannot write %s\n", argv[i] + 5);
                return -1;
            }
        } else if (g_str_has_prefix(argv[i], "nr=")) {
            marker_nr = g_ascii_strtoll(argv[i] + 3, NULL, 10);
        } else {
            fprintf(stderr, "bbcount: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    if (!out_path || marker_nr < 0) {
        fprintf(stderr, "bbcount: needs out=PATH and nr=SYSCALL_NUMBER\n");
        return -1;
    }
    blocks = g_hash_table_new(key_hash, key_equal);
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, vcpu_syscall);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
    return 0;
}
