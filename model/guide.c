/*
 * model/guide.c — guided decoding by a regular expression (vLLM's
 * guided_regex, and guided_json through serve/'s schema translation).
 * The pattern is compiled once, when the request is parsed, to a DFA
 * over bytes; at each step the row of logits is cut to the tokens whose
 * bytes keep the output a prefix of a match (and an end-of-generation
 * token where the output is a whole match).  Compiled by serve/ on the
 * request's thread; masked and advanced by sched/ on the engine thread.
 *
 * The pattern is over Unicode code points in UTF-8 and must match the
 * whole output.  Syntax (a subset of PCRE's, with its meanings):
 * literals, `.` (any code point but \n), classes `[...]` with ranges and
 * `^`, `\d \w \s` and their negations (ASCII), escapes `\n \t \r \f \v
 * \0 \xHH \x{H..} \uHHHH` and any escaped punctuation, groups `(...)`,
 * `(?:...)`, `(?<name>...)`, `(?P<name>...)`, alternation, quantifiers
 * `* + ? {n} {n,} {n,m} {,m}` (a lazy `?` after one is accepted: the
 * language is the same), `^` first and `$` last.  Anchors elsewhere,
 * lookaround, backreferences, Unicode properties, flags and possessive
 * quantifiers are refused, with the offset, rather than half-honoured.
 *
 * Parse to a tree, Thompson's construction to an NFA over byte ranges
 * (code point ranges become UTF-8 byte sequences), subset construction
 * to a DFA over byte classes, states that cannot reach a match folded
 * into the dead state.  The DFA is built whole and capped, so a pattern
 * too large is refused when the request is parsed, not mid-generation.
 * Masks walk the vocabulary in byte order (model__pieces) so each shared
 * prefix costs one transition, and each guide keeps the masks of its last
 * few states: in a JSON string the same state comes back token after
 * token.  A model keeps its last automata by pattern, so requests of one
 * schema compile it once and share it.
 */
#include "model_int.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    MAX_DEPTH = 256,                   /* nested groups */
    MAX_REPEAT = 1000,                 /* n and m of {n,m} */
    MAX_NFA = 1u << 20,                /* NFA states */
    MAX_CELLS = MODEL_GUIDE_MAX_CELLS, /* DFA states x byte classes: 16 MiB of transitions */
    MAX_WORK = 1 << 26,                /* NFA states visited building the DFA: ~0.3 s */
    N_CACHED = 8,                      /* masks kept */
    MAX_CP = 0x10FFFF,
};

/* ---- parse --------------------------------------------------------------- */

typedef struct {
    uint32_t lo, hi;
} cprange_t;

enum { A_EMPTY, A_SET, A_CAT, A_ALT, A_REP };

typedef struct {
    uint8_t kind;
    uint32_t k0, nk;   /* A_CAT, A_ALT: kids[k0 .. k0 + nk) */
    uint32_t r0, nr;   /* A_SET: ranges[r0 .. r0 + nr), sorted, disjoint */
    uint32_t sub;      /* A_REP */
    uint32_t min, max; /* A_REP; max UINT32_MAX: unbounded */
} anode_t;

typedef struct {
    const char *s;
    size_t n, i;
    anode_t *nodes;
    uint32_t n_nodes, cap_nodes;
    uint32_t *kids;
    uint32_t n_kids, cap_kids;
    cprange_t *ranges;
    uint32_t n_ranges, cap_ranges;
    char *err;
    size_t err_len;
    int rc;
} parser_t;

static int
fail(parser_t *p, const char *fmt, ...)
{
    if (p->rc == 0) {
        p->rc = KVS_EINVAL;
        if (p->err && p->err_len) {
            int k = snprintf(p->err, p->err_len, "at offset %zu: ", p->i);
            va_list ap;
            va_start(ap, fmt);
            if (k >= 0 && (size_t)k < p->err_len)
                vsnprintf(p->err + k, p->err_len - (size_t)k, fmt, ap);
            va_end(ap);
        }
    }
    return p->rc;
}

static int
oom(parser_t *p)
{
    if (p->rc == 0) {
        p->rc = KVS_ENOMEM;
        if (p->err && p->err_len)
            snprintf(p->err, p->err_len, "out of memory compiling the pattern");
    }
    return p->rc;
}

/* Grows *a (of *cap elements of size sz) to hold need. */
static int
grow(void **a, uint32_t *cap, uint32_t need, size_t sz)
{
    if (need <= *cap)
        return 0;
    uint32_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *b = realloc(*a, (size_t)c * sz);
    if (b == NULL)
        return KVS_ENOMEM;
    *a = b;
    *cap = c;
    return 0;
}

static uint32_t
new_node(parser_t *p, uint8_t kind)
{
    if (grow((void **)&p->nodes, &p->cap_nodes, p->n_nodes + 1, sizeof *p->nodes)) {
        oom(p);
        return 0;
    }
    anode_t *a = &p->nodes[p->n_nodes];
    memset(a, 0, sizeof *a);
    a->kind = kind;
    return p->n_nodes++;
}

static int
cmp_range(const void *a, const void *b)
{
    const cprange_t *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* The set of r[0..n) (in any order, overlapping), or its complement, as
 * a node.  Surrogates are never characters in UTF-8. */
static uint32_t
set_node(parser_t *p, cprange_t *r, uint32_t n, bool negate)
{
    qsort(r, n, sizeof *r, cmp_range);
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (m > 0 && r[i].lo <= r[m - 1].hi + 1) {
            if (r[i].hi > r[m - 1].hi)
                r[m - 1].hi = r[i].hi;
        } else {
            r[m++] = r[i];
        }
    }
    /* Complement: at most m + 1 ranges; cutting the surrogates out adds
     * at most one. */
    uint32_t id = new_node(p, A_SET);
    if (p->rc == 0 &&
        grow((void **)&p->ranges, &p->cap_ranges, p->n_ranges + m + 2, sizeof *p->ranges) != 0)
        oom(p);
    if (p->rc)
        return 0;
    cprange_t *o = p->ranges + p->n_ranges;
    uint32_t k = 0, next = 0;
    for (uint32_t i = 0; i <= m; i++) {
        cprange_t x;
        if (!negate && i < m)
            x = r[i];
        else if (negate && i < m && r[i].lo > next)
            x = (cprange_t){next, r[i].lo - 1};
        else if (negate && i == m && next <= MAX_CP)
            x = (cprange_t){next, MAX_CP};
        else
            x = (cprange_t){1, 0}; /* none */
        if (i < m)
            next = r[i].hi + 1;
        if (x.lo > x.hi)
            continue;
        if (x.lo < 0xD800)
            o[k++] = (cprange_t){x.lo, x.hi < 0xD7FF ? x.hi : 0xD7FF};
        if (x.hi > 0xDFFF)
            o[k++] = (cprange_t){x.lo > 0xE000 ? x.lo : 0xE000, x.hi};
    }
    p->nodes[id].r0 = p->n_ranges;
    p->nodes[id].nr = k;
    p->n_ranges += k;
    return id;
}

static uint32_t
char_node(parser_t *p, uint32_t c)
{
    cprange_t r = {c, c};
    return set_node(p, &r, 1, false);
}

/* Decodes one UTF-8 code point of the pattern at p->i. */
static int
next_cp(parser_t *p, uint32_t *cp)
{
    const uint8_t *s = (const uint8_t *)p->s + p->i;
    size_t left = p->n - p->i;
    uint32_t c = s[0], n, min;
    if (c < 0x80) {
        *cp = c;
        p->i++;
        return 0;
    }
    if ((c & 0xE0) == 0xC0)
        n = 2, c &= 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
        n = 3, c &= 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
        n = 4, c &= 0x07, min = 0x10000;
    else
        return fail(p, "invalid UTF-8");
    if (left < n)
        return fail(p, "invalid UTF-8");
    for (uint32_t k = 1; k < n; k++) {
        if ((s[k] & 0xC0) != 0x80)
            return fail(p, "invalid UTF-8");
        c = c << 6 | (s[k] & 0x3F);
    }
    if (c < min || c > MAX_CP || (c >= 0xD800 && c <= 0xDFFF))
        return fail(p, "invalid UTF-8");
    *cp = c;
    p->i += n;
    return 0;
}

/* n hex digits at p->i (0: a braced {H..} form) into *cp. */
static int
hex_cp(parser_t *p, uint32_t n, uint32_t *cp)
{
    uint32_t v = 0, k = 0;
    if (n == 0) {
        p->i++; /* { */
        while (p->i < p->n && p->s[p->i] != '}') {
            int h = kvs_hexval((unsigned char)p->s[p->i]);
            if (h < 0 || ++k > 6)
                return fail(p, "bad \\x{...} escape");
            v = v << 4 | (uint32_t)h;
            p->i++;
        }
        if (p->i >= p->n || k == 0)
            return fail(p, "bad \\x{...} escape");
        p->i++;
    } else {
        for (; k < n; k++, p->i++) {
            int h = p->i < p->n ? kvs_hexval((unsigned char)p->s[p->i]) : -1;
            if (h < 0)
                return fail(p, "bad hex escape");
            v = v << 4 | (uint32_t)h;
        }
    }
    if (v > MAX_CP || (v >= 0xD800 && v <= 0xDFFF))
        return fail(p, "escape U+%X is not a character", v);
    *cp = v;
    return 0;
}

/* Appends the ranges of class escape c (d w s, any case) to r[*n]: the
 * upper case ones as their complements. */
static int
class_escape(int c, cprange_t *r, uint32_t *n)
{
    static const cprange_t d[] = {{'0', '9'}};
    static const cprange_t w[] = {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
    static const cprange_t s[] = {{'\t', '\r'}, {' ', ' '}};
    static const cprange_t nd[] = {{0, '0' - 1}, {'9' + 1, MAX_CP}};
    static const cprange_t nw[] = {{0, '0' - 1},
                                   {'9' + 1, 'A' - 1},
                                   {'Z' + 1, '_' - 1},
                                   {'_' + 1, 'a' - 1},
                                   {'z' + 1, MAX_CP}};
    static const cprange_t ns[] = {{0, '\t' - 1}, {'\r' + 1, ' ' - 1}, {' ' + 1, MAX_CP}};
    const cprange_t *t;
    uint32_t k;
#define PICK(a) (t = (a), k = sizeof(a) / sizeof((a)[0]))
    switch (c) {
    case 'd':
        PICK(d);
        break;
    case 'w':
        PICK(w);
        break;
    case 's':
        PICK(s);
        break;
    case 'D':
        PICK(nd);
        break;
    case 'W':
        PICK(nw);
        break;
    case 'S':
        PICK(ns);
        break;
    default:
        return 0;
    }
#undef PICK
    memcpy(r + *n, t, k * sizeof *t);
    *n += k;
    return 1;
}

/* A single-character escape after '\' at p->i (the backslash consumed):
 * 1 with *cp, 0 for a class escape written to r, or an error. */
static int
escape(parser_t *p, bool in_class, uint32_t *cp, cprange_t *r, uint32_t *nr)
{
    if (p->i >= p->n)
        return fail(p, "pattern ends after '\\'");
    int c = (unsigned char)p->s[p->i];
    if (class_escape(c, r, nr)) {
        p->i++;
        return 0;
    }
    switch (c) {
    case 'n':
        *cp = '\n';
        break;
    case 't':
        *cp = '\t';
        break;
    case 'r':
        *cp = '\r';
        break;
    case 'f':
        *cp = '\f';
        break;
    case 'v':
        *cp = '\v';
        break;
    case '0':
        *cp = 0;
        break;
    case 'x':
        p->i++;
        if (hex_cp(p, p->i < p->n && p->s[p->i] == '{' ? 0 : 2, cp))
            return p->rc;
        return 1;
    case 'u':
        p->i++;
        if (hex_cp(p, 4, cp))
            return p->rc;
        return 1;
    case 'b':
        if (in_class) {
            *cp = '\b';
            break;
        }
        return fail(p, "\\b: word boundaries are not supported");
    case 'p':
    case 'P':
        return fail(p, "\\%c: Unicode properties are not supported", c);
    default:
        if (c >= '1' && c <= '9')
            return fail(p, "\\%c: backreferences are not supported", c);
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80)
            return fail(p, "\\%c: unknown escape", c);
        *cp = (uint32_t)c;
    }
    p->i++;
    return 1;
}

static uint32_t
parse_class(parser_t *p)
{
    p->i++; /* [ */
    bool neg = p->i < p->n && p->s[p->i] == '^';
    if (neg)
        p->i++;
    cprange_t *r = NULL;
    uint32_t n = 0, cap = 0;
    bool first = true;
    for (;;) {
        if (p->i >= p->n) {
            fail(p, "unterminated character class");
            break;
        }
        if (p->s[p->i] == ']' && !first) {
            p->i++;
            break;
        }
        first = false;
        if (grow((void **)&r, &cap, n + 8, sizeof *r)) {
            oom(p);
            break;
        }
        uint32_t lo;
        if (p->s[p->i] == '\\') {
            p->i++;
            int e = escape(p, true, &lo, r, &n);
            if (e < 0)
                break;
            if (e == 0) {
                if (p->i + 1 < p->n && p->s[p->i] == '-' && p->s[p->i + 1] != ']') {
                    fail(p, "a class escape cannot start a range");
                    break;
                }
                continue;
            }
        } else if (p->s[p->i] == '[' && p->i + 1 < p->n && p->s[p->i + 1] == ':') {
            fail(p, "POSIX classes are not supported");
            break;
        } else if (next_cp(p, &lo)) {
            break;
        }
        uint32_t hi = lo;
        if (p->i + 1 < p->n && p->s[p->i] == '-' && p->s[p->i + 1] != ']') {
            p->i++;
            if (p->s[p->i] == '\\') {
                p->i++;
                int e = escape(p, true, &hi, r, &n);
                if (e < 0)
                    break;
                if (e == 0) {
                    fail(p, "a class escape cannot end a range");
                    break;
                }
            } else if (next_cp(p, &hi)) {
                break;
            }
            if (hi < lo) {
                fail(p, "range out of order");
                break;
            }
        }
        r[n++] = (cprange_t){lo, hi};
    }
    uint32_t id = p->rc ? 0 : set_node(p, r, n, neg);
    free(r);
    return id;
}

static uint32_t parse_alt(parser_t *p, int depth);

/* Reads a decimal number of at most MAX_REPEAT; false when none. */
static bool
read_count(parser_t *p, size_t *i, uint32_t *v, bool *big)
{
    size_t j = *i;
    uint64_t x = 0;
    while (j < p->n && p->s[j] >= '0' && p->s[j] <= '9') {
        x = x * 10 + (uint64_t)(p->s[j] - '0');
        if (x > MAX_REPEAT)
            *big = true, x = MAX_REPEAT + 1;
        j++;
    }
    if (j == *i)
        return false;
    *v = (uint32_t)x;
    *i = j;
    return true;
}

/* A {n}, {n,}, {n,m} or {,m} at p->i: true with the bounds; false (and
 * p->i unchanged) when the brace is a literal, as in PCRE. */
static bool
brace_quant(parser_t *p, uint32_t *min, uint32_t *max)
{
    size_t j = p->i + 1;
    bool big = false, have_min = read_count(p, &j, min, &big);
    if (j < p->n && p->s[j] == '}') {
        if (!have_min)
            return false;
        *max = *min;
    } else if (j < p->n && p->s[j] == ',') {
        j++;
        bool have_max = read_count(p, &j, max, &big);
        if (j >= p->n || p->s[j] != '}' || (!have_min && !have_max))
            return false;
        if (!have_min)
            *min = 0;
        if (!have_max)
            *max = UINT32_MAX;
    } else {
        return false;
    }
    p->i = j + 1;
    if (big)
        fail(p, "repeat count above %d", MAX_REPEAT);
    else if (*max < *min)
        fail(p, "repeat bounds out of order");
    return true;
}

static uint32_t
parse_atom(parser_t *p, int depth)
{
    char c = p->s[p->i];
    switch (c) {
    case '(': {
        if (depth >= MAX_DEPTH) {
            fail(p, "groups nested deeper than %d", MAX_DEPTH);
            return 0;
        }
        p->i++;
        if (p->i < p->n && p->s[p->i] == '?') {
            const char *q = p->s + p->i + 1;
            size_t left = p->n - p->i - 1;
            if (left >= 1 && q[0] == ':') {
                p->i += 2;
            } else if ((left >= 2 && q[0] == '<' && q[1] != '=' && q[1] != '!') ||
                       (left >= 2 && q[0] == 'P' && q[1] == '<')) {
                size_t j = p->i + (q[0] == 'P' ? 3 : 2);
                while (j < p->n && p->s[j] != '>')
                    j++;
                if (j >= p->n) {
                    fail(p, "unterminated group name");
                    return 0;
                }
                p->i = j + 1;
            } else if (left >= 1 && (q[0] == '=' || q[0] == '!' || q[0] == '<')) {
                fail(p, "lookaround is not supported");
                return 0;
            } else {
                fail(p, "group flags are not supported");
                return 0;
            }
        }
        uint32_t g = parse_alt(p, depth + 1);
        if (p->rc)
            return 0;
        if (p->i >= p->n || p->s[p->i] != ')') {
            fail(p, "missing ')'");
            return 0;
        }
        p->i++;
        return g;
    }
    case '[':
        return parse_class(p);
    case '.': {
        p->i++;
        cprange_t r[2] = {{0, '\n' - 1}, {'\n' + 1, MAX_CP}};
        return set_node(p, r, 2, false);
    }
    case '\\': {
        p->i++;
        cprange_t r[8];
        uint32_t nr = 0, cp = 0;
        int e = escape(p, false, &cp, r, &nr);
        if (e < 0)
            return 0;
        return e ? char_node(p, cp) : set_node(p, r, nr, false);
    }
    case '*':
    case '+':
    case '?':
        fail(p, "'%c' has nothing to repeat", c);
        return 0;
    case '^':
        fail(p, "'^' is only supported at the start");
        return 0;
    case '$':
        fail(p, "'$' is only supported at the end");
        return 0;
    default: {
        uint32_t cp;
        if (c == '{') {
            uint32_t a, b;
            size_t at = p->i;
            if (brace_quant(p, &a, &b)) {
                p->i = at;
                fail(p, "'{' has nothing to repeat");
                return 0;
            }
        }
        if (next_cp(p, &cp))
            return 0;
        return char_node(p, cp);
    }
    }
}

static uint32_t
parse_rep(parser_t *p, int depth)
{
    uint32_t a = parse_atom(p, depth);
    while (p->rc == 0 && p->i < p->n) {
        uint32_t min, max;
        char c = p->s[p->i];
        if (c == '*')
            min = 0, max = UINT32_MAX, p->i++;
        else if (c == '+')
            min = 1, max = UINT32_MAX, p->i++;
        else if (c == '?')
            min = 0, max = 1, p->i++;
        else if (c == '{' && brace_quant(p, &min, &max))
            ;
        else
            break;
        if (p->rc)
            return 0;
        if (p->i < p->n && p->s[p->i] == '+') {
            fail(p, "possessive quantifiers are not supported");
            return 0;
        }
        if (p->i < p->n && p->s[p->i] == '?')
            p->i++; /* lazy: the same strings match */
        if (p->i < p->n &&
            (p->s[p->i] == '*' || p->s[p->i] == '+' || p->s[p->i] == '?' || p->s[p->i] == '{')) {
            uint32_t a2, b2;
            size_t at = p->i;
            bool quant = p->s[p->i] != '{' || brace_quant(p, &a2, &b2);
            p->i = at;
            if (quant) {
                fail(p, "'%c' has nothing to repeat", p->s[p->i]);
                return 0;
            }
        }
        uint32_t r = new_node(p, A_REP);
        if (p->rc)
            return 0;
        p->nodes[r].sub = a;
        p->nodes[r].min = min;
        p->nodes[r].max = max;
        a = r;
    }
    return a;
}

/* Moves the n ids at the top of kids (from `from`) into a CAT or ALT node. */
static uint32_t
list_node(parser_t *p, uint8_t kind, uint32_t *items, uint32_t n)
{
    if (n == 1)
        return items[0];
    uint32_t id = new_node(p, n == 0 ? A_EMPTY : kind);
    if (p->rc || n == 0)
        return id;
    if (grow((void **)&p->kids, &p->cap_kids, p->n_kids + n, sizeof *p->kids)) {
        oom(p);
        return 0;
    }
    memcpy(p->kids + p->n_kids, items, n * sizeof *items);
    p->nodes[id].k0 = p->n_kids;
    p->nodes[id].nk = n;
    p->n_kids += n;
    return id;
}

static uint32_t
parse_cat(parser_t *p, int depth)
{
    uint32_t *items = NULL, n = 0, cap = 0;
    while (p->rc == 0 && p->i < p->n && p->s[p->i] != '|' && p->s[p->i] != ')') {
        if (p->s[p->i] == '$' && p->i + 1 == p->n && depth == 0) {
            p->i++;
            break;
        }
        uint32_t a = parse_rep(p, depth);
        if (p->rc)
            break;
        if (grow((void **)&items, &cap, n + 1, sizeof *items)) {
            oom(p);
            break;
        }
        items[n++] = a;
    }
    uint32_t id = p->rc ? 0 : list_node(p, A_CAT, items, n);
    free(items);
    return id;
}

static uint32_t
parse_alt(parser_t *p, int depth)
{
    uint32_t *items = NULL, n = 0, cap = 0;
    for (;;) {
        uint32_t a = parse_cat(p, depth);
        if (p->rc)
            break;
        if (grow((void **)&items, &cap, n + 1, sizeof *items)) {
            oom(p);
            break;
        }
        items[n++] = a;
        if (p->i < p->n && p->s[p->i] == '|')
            p->i++;
        else
            break;
    }
    uint32_t id = p->rc ? 0 : list_node(p, A_ALT, items, n);
    free(items);
    return id;
}

/* ---- NFA ------------------------------------------------------------------ */

enum { S_BYTE, S_SPLIT, S_MATCH };

typedef struct {
    uint8_t kind, lo, hi;
    uint32_t out, out1;
} nstate_t;

typedef struct {
    parser_t *p;
    nstate_t *st;
    uint32_t n, cap;
    /* A set's UTF-8 suffixes shared: (lo, hi, next) -> state. */
    uint32_t *memo;
    uint32_t n_memo, cap_memo;
} nfa_t;

#define NFA_FAIL UINT32_MAX

static uint32_t
add_state(nfa_t *a, uint8_t kind, uint8_t lo, uint8_t hi, uint32_t out, uint32_t out1)
{
    if (a->p->rc)
        return NFA_FAIL;
    if (a->n >= MAX_NFA) {
        fail(a->p, "pattern too large (over %u NFA states)", MAX_NFA);
        return NFA_FAIL;
    }
    if (grow((void **)&a->st, &a->cap, a->n + 1, sizeof *a->st)) {
        oom(a->p);
        return NFA_FAIL;
    }
    a->st[a->n] = (nstate_t){kind, lo, hi, out, out1};
    return a->n++;
}

static uint32_t
byte_state(nfa_t *a, uint8_t lo, uint8_t hi, uint32_t next)
{
    for (uint32_t k = 0; k < a->n_memo; k++) {
        const uint32_t *m = a->memo + 4 * k;
        if (m[0] == lo && m[1] == hi && m[2] == next)
            return m[3];
    }
    uint32_t s = add_state(a, S_BYTE, lo, hi, next, 0);
    if (s != NFA_FAIL &&
        grow((void **)&a->memo, &a->cap_memo, 4 * (a->n_memo + 1), sizeof *a->memo) == 0) {
        uint32_t *m = a->memo + 4 * a->n_memo++;
        m[0] = lo, m[1] = hi, m[2] = next, m[3] = s;
    }
    return s;
}

static uint32_t
alt2(nfa_t *a, uint32_t x, uint32_t y)
{
    if (x == NFA_FAIL)
        return y;
    if (y == NFA_FAIL)
        return x;
    return add_state(a, S_SPLIT, 0, 0, x, y);
}

/* [lo, hi] (one UTF-8 length) as byte-range sequences into next, joined
 * with *alt: split until each piece is a product of byte ranges. */
static void
utf8_seq(nfa_t *a, uint32_t lo, uint32_t hi, uint32_t next, uint32_t *alt)
{
    uint32_t n = kvs_utf8_len(lo);
    for (uint32_t i = 1; i < n; i++) {
        uint32_t m = (1u << (6 * i)) - 1;
        if ((lo & ~m) != (hi & ~m)) {
            if ((lo & m) != 0) {
                utf8_seq(a, lo, lo | m, next, alt);
                utf8_seq(a, (lo | m) + 1, hi, next, alt);
                return;
            }
            if ((hi & m) != m) {
                utf8_seq(a, lo, (hi & ~m) - 1, next, alt);
                utf8_seq(a, hi & ~m, hi, next, alt);
                return;
            }
        }
    }
    uint8_t bl[4], bh[4];
    kvs_utf8_put(lo, bl);
    kvs_utf8_put(hi, bh);
    uint32_t s = next;
    for (uint32_t k = n; k-- > 0 && s != NFA_FAIL;)
        s = byte_state(a, bl[k], bh[k], s);
    *alt = alt2(a, *alt, s);
}

static uint32_t
set_start(nfa_t *a, const anode_t *x, uint32_t next)
{
    static const uint32_t bound[] = {0x7F, 0x7FF, 0xFFFF, MAX_CP};
    uint32_t alt = NFA_FAIL;
    a->n_memo = 0;
    for (uint32_t i = 0; i < x->nr; i++) {
        uint32_t lo = a->p->ranges[x->r0 + i].lo, hi = a->p->ranges[x->r0 + i].hi;
        for (uint32_t b = 0; b < 4 && lo <= hi; b++) {
            if (lo > bound[b])
                continue;
            uint32_t h = hi < bound[b] ? hi : bound[b];
            utf8_seq(a, lo, h, next, &alt);
            lo = h + 1;
        }
    }
    /* An empty set matches nothing: a state no byte leaves. */
    return alt == NFA_FAIL ? add_state(a, S_BYTE, 1, 0, next, 0) : alt;
}

/* The start of node x followed by next (built back to front, so a node
 * knows where it goes on). */
static uint32_t
compile(nfa_t *a, uint32_t xi, uint32_t next)
{
    const anode_t x = a->p->nodes[xi];
    if (a->p->rc)
        return NFA_FAIL;
    switch (x.kind) {
    case A_EMPTY:
        return next;
    case A_SET:
        return set_start(a, &x, next);
    case A_CAT:
        for (uint32_t k = x.nk; k-- > 0 && next != NFA_FAIL;)
            next = compile(a, a->p->kids[x.k0 + k], next);
        return next;
    case A_ALT: {
        uint32_t s = compile(a, a->p->kids[x.k0 + x.nk - 1], next);
        for (uint32_t k = x.nk - 1; k-- > 0 && s != NFA_FAIL;)
            s = add_state(a, S_SPLIT, 0, 0, compile(a, a->p->kids[x.k0 + k], next), s);
        return s;
    }
    default: {
        uint32_t s = next;
        if (x.max == UINT32_MAX) {
            uint32_t loop = add_state(a, S_SPLIT, 0, 0, 0, next);
            uint32_t body = compile(a, x.sub, loop);
            if (body == NFA_FAIL)
                return NFA_FAIL;
            a->st[loop].out = body;
            s = loop;
        } else {
            /* x? nested: (x(x(x)?)?)?, one way to skip the rest. */
            for (uint32_t k = x.min; k < x.max && s != NFA_FAIL; k++)
                s = add_state(a, S_SPLIT, 0, 0, compile(a, x.sub, s), next);
        }
        for (uint32_t k = 0; k < x.min && s != NFA_FAIL; k++)
            s = compile(a, x.sub, s);
        return s;
    }
    }
}

/* ---- DFA ------------------------------------------------------------------ */

typedef struct guide_dfa {
    _Atomic uint32_t refs;
    const model_t *m;
    const model_pieces_t *pt;
    uint32_t n_states, n_classes;
    uint8_t cls[256];
    uint32_t *trans; /* [n_states * n_classes]; 0 is the dead state */
    uint8_t *flags;  /* [n_states] */
    uint32_t start;
} guide_dfa_t;

enum { F_ACCEPT = 1, F_OVER = 2 };

/* The automaton is never written after it is built, so requests on any
 * thread share it; what a mask walk writes belongs to one guide. */
struct model_guide {
    guide_dfa_t *d;
    uint32_t cur;
    /* The masks of the last N_CACHED states asked for, made at first use. */
    uint64_t *bits; /* [N_CACHED][words] */
    uint32_t words;
    uint32_t cached[N_CACHED]; /* state, 0: empty */
    uint64_t used[N_CACHED], tick;
    uint32_t *stack; /* [max_len + 1] */
};

typedef struct {
    nfa_t *a;
    uint32_t *mark, gen;
    uint32_t *stack;
    uint64_t work; /* states visited, for MAX_WORK */
} closure_t;

/* Adds the closure of s over splits to set[*n] (BYTE and MATCH states). */
static void
closure_add(closure_t *c, uint32_t s, uint32_t *set, uint32_t *n)
{
    uint32_t top = 0;
    c->stack[top++] = s;
    while (top) {
        uint32_t x = c->stack[--top];
        c->work++;
        if (c->mark[x] == c->gen)
            continue;
        c->mark[x] = c->gen;
        const nstate_t *q = &c->a->st[x];
        if (q->kind == S_SPLIT) {
            c->stack[top++] = q->out1;
            c->stack[top++] = q->out;
        } else if (q->kind == S_MATCH || q->lo <= q->hi) {
            set[(*n)++] = x;
        }
    }
}

static int
cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t
set_hash(const uint32_t *s, uint32_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ull;
    return h ^ n;
}

typedef struct {
    uint32_t *sets; /* concatenated */
    uint32_t n_sets_words, cap_words;
    uint32_t *off, *len; /* per DFA state */
    uint32_t cap_states;
    uint32_t *table; /* open addressing: state + 1, 0 empty */
    uint32_t table_cap;
} interner_t;

/* The DFA state for sorted set s[n]: found or added (trans filled later).
 * Returns the id, or 0 with p->rc set. */
static uint32_t
intern(guide_dfa_t *d, interner_t *in, parser_t *p, const uint32_t *s, uint32_t n)
{
    uint64_t h = set_hash(s, n);
    uint32_t mask = in->table_cap - 1;
    for (uint32_t k = (uint32_t)h & mask;; k = (k + 1) & mask) {
        uint32_t e = in->table[k];
        if (e == 0)
            break;
        e--;
        if (in->len[e] == n && (n == 0 || memcmp(in->sets + in->off[e], s, n * sizeof *s) == 0))
            return e;
    }
    uint32_t id = d->n_states;
    if (id >= MODEL_GUIDE_MAX_STATES || (uint64_t)(id + 1) * d->n_classes > MAX_CELLS) {
        fail(p, "pattern too complex: its automaton passes %u states", id);
        return 0;
    }
    if (grow((void **)&in->off, &in->cap_states, id + 1, sizeof *in->off)) {
        oom(p);
        return 0;
    }
    uint32_t cap = in->cap_states;
    if ((in->len = realloc(in->len, cap * sizeof *in->len)) == NULL ||
        grow((void **)&in->sets, &in->cap_words, in->n_sets_words + n, sizeof *in->sets)) {
        oom(p);
        return 0;
    }
    in->off[id] = in->n_sets_words;
    in->len[id] = n;
    if (n) /* the dead state's empty set comes first, before any storage */
        memcpy(in->sets + in->n_sets_words, s, n * sizeof *s);
    in->n_sets_words += n;
    d->n_states++;
    /* Rehash at half full. */
    if (2 * d->n_states > in->table_cap) {
        uint32_t nc = in->table_cap * 2;
        uint32_t *t = calloc(nc, sizeof *t);
        if (t == NULL) {
            oom(p);
            return 0;
        }
        for (uint32_t e = 0; e < d->n_states; e++) {
            uint32_t k = (uint32_t)set_hash(in->sets + in->off[e], in->len[e]) & (nc - 1);
            while (t[k])
                k = (k + 1) & (nc - 1);
            t[k] = e + 1;
        }
        free(in->table);
        in->table = t;
        in->table_cap = nc;
    } else {
        uint32_t k = (uint32_t)h & mask;
        while (in->table[k])
            k = (k + 1) & mask;
        in->table[k] = id + 1;
    }
    return id;
}

/* Byte classes: bytes no range of the NFA tells apart share one. */
static void
byte_classes(guide_dfa_t *d, const nfa_t *a)
{
    uint8_t cut[257] = {0};
    for (uint32_t i = 0; i < a->n; i++)
        if (a->st[i].kind == S_BYTE && a->st[i].lo <= a->st[i].hi) {
            cut[a->st[i].lo] = 1;
            cut[a->st[i].hi + 1] = 1;
        }
    uint32_t c = 0;
    for (uint32_t b = 0; b < 256; b++) {
        if (b > 0 && cut[b])
            c++;
        d->cls[b] = (uint8_t)c;
    }
    d->n_classes = c + 1;
}

/* States from which no match can be reached become the dead state. */
static int
prune(guide_dfa_t *d)
{
    uint32_t ns = d->n_states, nc = d->n_classes;
    uint32_t *cnt = calloc(ns + 1, sizeof *cnt), *src = malloc((size_t)ns * nc * sizeof *src);
    uint32_t *queue = malloc(ns * sizeof *queue);
    uint8_t *live = calloc(ns, 1);
    int rc = 0;
    if (!cnt || !src || !queue || !live) {
        rc = KVS_ENOMEM;
        goto out;
    }
    for (size_t e = 0; e < (size_t)ns * nc; e++)
        cnt[d->trans[e] + 1]++;
    for (uint32_t s = 0; s < ns; s++)
        cnt[s + 1] += cnt[s];
    for (size_t e = 0; e < (size_t)ns * nc; e++)
        src[cnt[d->trans[e]]++] = (uint32_t)(e / nc);
    /* cnt[t] now ends t's sources; they start where t - 1's end. */
    uint32_t head = 0, tail = 0;
    for (uint32_t s = 1; s < ns; s++)
        if (d->flags[s] & F_ACCEPT)
            live[s] = 1, queue[tail++] = s;
    while (head < tail) {
        uint32_t t = queue[head++];
        for (uint32_t k = t ? cnt[t - 1] : 0; k < cnt[t]; k++)
            if (!live[src[k]] && src[k] != 0)
                live[src[k]] = 1, queue[tail++] = src[k];
    }
    for (uint32_t s = 0; s < ns; s++) {
        bool any = false;
        for (uint32_t c = 0; c < nc; c++) {
            uint32_t *t = &d->trans[(size_t)s * nc + c];
            if (!live[*t])
                *t = 0;
            any |= *t != 0;
        }
        if (!live[s])
            d->flags[s] = 0;
        else if (!any)
            d->flags[s] |= F_OVER;
    }
    if (!live[d->start])
        d->start = 0;
out:
    free(cnt);
    free(src);
    free(queue);
    free(live);
    return rc;
}

static int
build_dfa(guide_dfa_t *d, nfa_t *a, uint32_t nfa_start, parser_t *p)
{
    byte_classes(d, a);
    uint32_t nc = d->n_classes;
    interner_t in = {0};
    closure_t c = {.a = a,
                   .mark = calloc(a->n, sizeof(uint32_t)),
                   .stack = malloc((2 * (size_t)a->n + 2) * sizeof(uint32_t))};
    uint32_t *set = malloc(a->n * sizeof *set);
    uint32_t *bucket_n = calloc(nc, sizeof *bucket_n);
    uint32_t **bucket = calloc(nc, sizeof *bucket);
    uint32_t *bucket_cap = calloc(nc, sizeof *bucket_cap);
    uint32_t cap_trans = 0;
    in.table_cap = 64;
    in.table = calloc(in.table_cap, sizeof *in.table);
    if (!c.mark || !c.stack || !set || !bucket_n || !bucket || !bucket_cap || !in.table) {
        oom(p);
        goto out;
    }
    /* State 0: dead (the empty set). */
    intern(d, &in, p, set, 0);
    c.gen++;
    uint32_t n = 0;
    closure_add(&c, nfa_start, set, &n);
    qsort(set, n, sizeof *set, cmp_u32);
    d->start = intern(d, &in, p, set, n);
    for (uint32_t s = 0; s < d->n_states && p->rc == 0; s++) {
        if (grow((void **)&d->trans, &cap_trans, (s + 1) * nc, sizeof *d->trans)) {
            oom(p);
            break;
        }
        for (uint32_t k = 0; k < nc; k++)
            bucket_n[k] = 0;
        bool accept = false;
        for (uint32_t k = 0; k < in.len[s]; k++) {
            const nstate_t *q = &a->st[in.sets[in.off[s] + k]];
            if (q->kind == S_MATCH) {
                accept = true;
                continue;
            }
            for (uint32_t cl = d->cls[q->lo]; cl <= d->cls[q->hi]; cl++) {
                if (grow((void **)&bucket[cl], &bucket_cap[cl], bucket_n[cl] + 1,
                         sizeof **bucket)) {
                    oom(p);
                    goto out;
                }
                bucket[cl][bucket_n[cl]++] = q->out;
                c.work++;
            }
        }
        uint8_t *f = realloc(d->flags, s + 1);
        if (f == NULL) {
            oom(p);
            break;
        }
        d->flags = f;
        d->flags[s] = accept ? F_ACCEPT : 0;
        for (uint32_t cl = 0; cl < nc && p->rc == 0; cl++) {
            c.gen++;
            n = 0;
            for (uint32_t k = 0; k < bucket_n[cl]; k++)
                closure_add(&c, bucket[cl][k], set, &n);
            qsort(set, n, sizeof *set, cmp_u32);
            d->trans[(size_t)s * nc + cl] = n ? intern(d, &in, p, set, n) : 0;
            c.work += n;
        }
        /* Few states can still hold huge sets: bound the time, not only
         * the size (the request's thread waits for this). */
        if (p->rc == 0 && c.work > MAX_WORK)
            fail(p, "pattern too complex: its automaton takes over %llu steps to build",
                 (unsigned long long)MAX_WORK);
    }
    if (p->rc == 0 && prune(d) != 0)
        oom(p);
    if (p->rc == 0 && d->start == 0)
        fail(p, "the pattern matches nothing");
out:
    for (uint32_t k = 0; bucket && k < nc; k++)
        free(bucket[k]);
    free(bucket);
    free(bucket_n);
    free(bucket_cap);
    free(set);
    free(c.mark);
    free(c.stack);
    free(in.sets);
    free(in.off);
    free(in.len);
    free(in.table);
    return p->rc;
}

static void
dfa_unref(guide_dfa_t *d)
{
    if (d == NULL || atomic_fetch_sub(&d->refs, 1) != 1)
        return;
    free(d->trans);
    free(d->flags);
    free(d);
}

/* ---- compiled automata kept per model --------------------------------- */

/* Requests of one schema or pattern arrive again and again: the last
 * CACHE_ENTRIES automata of a model are kept by their pattern (those of
 * at most CACHE_CELLS transitions), so each compiles once. */
enum { CACHE_ENTRIES = 16, CACHE_CELLS = 1 << 20 };

typedef struct guide_cache {
    pthread_mutex_t mu;
    struct {
        char *pattern;
        size_t len;
        guide_dfa_t *d;
        uint64_t used;
    } e[CACHE_ENTRIES];
    uint64_t tick;
} guide_cache_t;

static guide_cache_t *
cache_of(const model_t *m)
{
    /* A cache: keeping automata does not change the model. */
    _Atomic(void *) *slot = &((model_t *)m)->guides;
    guide_cache_t *c = atomic_load(slot);
    if (c)
        return c;
    if ((c = calloc(1, sizeof *c)) == NULL)
        return NULL;
    pthread_mutex_init(&c->mu, NULL);
    void *expect = NULL;
    if (!atomic_compare_exchange_strong(slot, &expect, c)) {
        pthread_mutex_destroy(&c->mu);
        free(c);
        return expect;
    }
    return c;
}

/* The kept automaton of this pattern, with a reference for the caller. */
static guide_dfa_t *
cache_find(guide_cache_t *c, const char *pattern, size_t len)
{
    guide_dfa_t *d = NULL;
    pthread_mutex_lock(&c->mu);
    for (int k = 0; k < CACHE_ENTRIES && d == NULL; k++)
        if (c->e[k].d && c->e[k].len == len && memcmp(c->e[k].pattern, pattern, len) == 0) {
            d = c->e[k].d;
            atomic_fetch_add(&d->refs, 1);
            c->e[k].used = ++c->tick;
        }
    pthread_mutex_unlock(&c->mu);
    return d;
}

static void
cache_put(guide_cache_t *c, const char *pattern, size_t len, guide_dfa_t *d)
{
    if ((uint64_t)d->n_states * d->n_classes > CACHE_CELLS)
        return;
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return;
    memcpy(copy, pattern, len);
    pthread_mutex_lock(&c->mu);
    int lru = 0;
    for (int k = 1; k < CACHE_ENTRIES; k++)
        if (c->e[k].used < c->e[lru].used)
            lru = k;
    free(c->e[lru].pattern);
    dfa_unref(c->e[lru].d);
    atomic_fetch_add(&d->refs, 1);
    c->e[lru].pattern = copy;
    c->e[lru].len = len;
    c->e[lru].d = d;
    c->e[lru].used = ++c->tick;
    pthread_mutex_unlock(&c->mu);
}

void
model__guides_free(model_t *m)
{
    guide_cache_t *c = atomic_exchange(&m->guides, NULL);
    if (c == NULL)
        return;
    for (int k = 0; k < CACHE_ENTRIES; k++) {
        free(c->e[k].pattern);
        dfa_unref(c->e[k].d);
    }
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* A guide at the start of d, taking over the caller's reference. */
static model_guide_t *
guide_on(guide_dfa_t *d)
{
    model_guide_t *g = calloc(1, sizeof *g);
    if (g) {
        g->d = d;
        g->cur = d->start;
    }
    return g;
}

int
model_guide_new(const model_t *m, const char *pattern, size_t len, model_guide_t **out, char *err,
                size_t err_len)
{
    *out = NULL;
    if (err && err_len)
        err[0] = '\0';
    parser_t p = {.s = pattern, .n = len, .err = err, .err_len = err_len};
    nfa_t a = {.p = &p};
    guide_dfa_t *d = NULL;
    guide_cache_t *cache = cache_of(m);
    if (pattern == NULL) {
        fail(&p, "no pattern");
        goto out;
    }
    if (cache && (d = cache_find(cache, pattern, len)) != NULL) {
        if ((*out = guide_on(d)) == NULL)
            oom(&p);
        else
            d = NULL;
        goto out;
    }
    if (len > 0 && pattern[0] == '^')
        p.i++;
    uint32_t root = parse_alt(&p, 0);
    if (p.rc == 0 && p.i < p.n)
        fail(&p, "unmatched ')'");
    if (p.rc)
        goto out;
    uint32_t match = add_state(&a, S_MATCH, 0, 0, 0, 0);
    uint32_t start = compile(&a, root, match);
    if (p.rc)
        goto out;
    const model_pieces_t *pt = model__pieces(m);
    if (pt == NULL || (d = calloc(1, sizeof *d)) == NULL) {
        oom(&p);
        goto out;
    }
    atomic_init(&d->refs, 1);
    d->m = m;
    d->pt = pt;
    if (build_dfa(d, &a, start, &p))
        goto out;
    if (cache)
        cache_put(cache, pattern, len, d);
    if ((*out = guide_on(d)) == NULL)
        oom(&p);
    else
        d = NULL;
out:
    free(p.nodes);
    free(p.kids);
    free(p.ranges);
    free(a.st);
    free(a.memo);
    dfa_unref(d);
    return p.rc;
}

int
model_guide_clone(const model_guide_t *g, model_guide_t **out)
{
    atomic_fetch_add(&g->d->refs, 1);
    if ((*out = guide_on(g->d)) == NULL) {
        dfa_unref(g->d);
        return KVS_ENOMEM;
    }
    (*out)->cur = g->cur;
    return 0;
}

void
model_guide_free(model_guide_t *g)
{
    if (g) {
        dfa_unref(g->d);
        free(g->bits);
        free(g->stack);
        free(g);
    }
}

bool
model_guide_shares(const model_guide_t *a, const model_guide_t *b)
{
    return a->d == b->d;
}

uint32_t
model_guide_states(const model_guide_t *g)
{
    return g->d->n_states;
}

static uint32_t
step(const guide_dfa_t *d, uint32_t s, const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n && s; i++)
        s = d->trans[(size_t)s * d->n_classes + d->cls[b[i]]];
    return s;
}

bool
model_guide_fullmatch(const model_guide_t *g, const char *s, size_t n)
{
    return (g->d->flags[step(g->d, g->d->start, (const uint8_t *)s, n)] & F_ACCEPT) != 0;
}

/* Which tokens state s lets through, into bits. */
static void
fill_mask(model_guide_t *g, uint32_t s, uint64_t *bits)
{
    const guide_dfa_t *d = g->d;
    const model_pieces_t *pt = d->pt;
    uint32_t nc = d->n_classes, *st = g->stack, valid = 0;
    memset(bits, 0, g->words * sizeof *bits);
    st[0] = s;
    for (uint32_t k = 0; k < pt->n_sorted; k++) {
        uint32_t l = pt->lcp[k];
        if (l > valid)
            continue; /* shares a prefix that died */
        uint32_t id = pt->sorted[k], j = l, t = st[l];
        uint32_t a = pt->off[id], len = pt->off[id + 1] - a;
        const uint8_t *b = pt->bytes + a;
        for (; j < len; j++) {
            t = d->trans[(size_t)t * nc + d->cls[b[j]]];
            if (t == 0)
                break;
            st[j + 1] = t;
        }
        valid = j;
        if (j == len)
            bits[id >> 6] |= 1ull << (id & 63);
    }
    if (d->flags[s] & F_ACCEPT) {
        const int32_t *eog;
        uint32_t ne = model_vocab_eog(d->m->vocab, &eog);
        for (uint32_t k = 0; k < ne; k++)
            bits[eog[k] >> 6] |= 1ull << (eog[k] & 63);
    }
}

/* The mask of state s, NULL when out of memory. */
static const uint64_t *
mask_bits(model_guide_t *g, uint32_t s)
{
    if (g->bits == NULL) {
        g->words = (g->d->m->hp.n_vocab + 63) / 64;
        g->bits = malloc((size_t)N_CACHED * g->words * sizeof *g->bits);
        g->stack = malloc(((size_t)g->d->pt->max_len + 1) * sizeof *g->stack);
        if (g->bits == NULL || g->stack == NULL) {
            free(g->bits);
            free(g->stack);
            g->bits = NULL;
            g->stack = NULL;
            return NULL;
        }
    }
    uint32_t lru = 0;
    for (uint32_t k = 0; k < N_CACHED; k++) {
        if (g->cached[k] == s && g->used[k]) {
            g->used[k] = ++g->tick;
            return g->bits + (size_t)k * g->words;
        }
        if (g->used[k] < g->used[lru])
            lru = k;
    }
    uint64_t *b = g->bits + (size_t)lru * g->words;
    fill_mask(g, s, b);
    g->cached[lru] = s;
    g->used[lru] = ++g->tick;
    return b;
}

uint32_t
model_guide_mask(model_guide_t *g, const float *row, float *out)
{
    const uint64_t *bits = mask_bits(g, g->cur);
    uint32_t nv = g->d->m->hp.n_vocab, allowed = 0;
    if (bits == NULL) {
        /* Out of memory: nothing to draw, which fails the request. */
        for (uint32_t id = 0; id < nv; id++)
            out[id] = -INFINITY;
        return 0;
    }
    /* A word at a time: most are all out or all in. */
    for (uint32_t w = 0; w * 64 < nv; w++) {
        uint32_t base = w * 64, n = nv - base < 64 ? nv - base : 64;
        uint64_t b = bits[w];
        allowed += (uint32_t)__builtin_popcountll(b);
        if (b == 0) {
            for (uint32_t k = 0; k < n; k++)
                out[base + k] = -INFINITY;
        } else if (b == ~0ull) {
            memcpy(out + base, row + base, n * sizeof *out);
        } else {
            for (uint32_t k = 0; k < n; k++)
                out[base + k] = b >> k & 1 ? row[base + k] : -INFINITY;
        }
    }
    return allowed;
}

int
model_guide_accept(model_guide_t *g, int32_t id)
{
    const guide_dfa_t *d = g->d;
    if (id < 0 || (uint32_t)id >= d->m->hp.n_vocab)
        return KVS_EINVAL;
    if (model_vocab_is_eog(d->m->vocab, id))
        return d->flags[g->cur] & F_ACCEPT ? 1 : KVS_EINVAL;
    const model_pieces_t *pt = d->pt;
    uint32_t a = pt->off[id], n = pt->off[id + 1] - a;
    uint32_t s = n ? step(d, g->cur, pt->bytes + a, n) : 0;
    if (s == 0)
        return KVS_EINVAL;
    g->cur = s;
    return d->flags[s] & F_OVER ? 1 : 0;
}
