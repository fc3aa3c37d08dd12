/*
 * model/guide.c — guided decoding by a regular expression (vLLM's
 * guided_regex, and guided_json through serve/'s schema translation) or
 * a GBNF grammar (guided_grammar; see "grammars" below).
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
 *
 * A grammar is parsed to the same tree, one per rule, with rule uses as
 * calls in the NFA; its DFA states are sets of pushdown threads, found
 * as the output reaches them and kept in the same table (see "grammar
 * automata"), so masks and their cache serve both.
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

enum { A_EMPTY, A_SET, A_CAT, A_ALT, A_REP, A_REF };

typedef struct {
    uint8_t kind;
    uint32_t k0, nk;   /* A_CAT, A_ALT: kids[k0 .. k0 + nk); A_REF: k0 the rule */
    uint32_t r0, nr;   /* A_SET: ranges[r0 .. r0 + nr), sorted, disjoint; A_REF: its name */
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
    /* Doubling in 64 bits: a 32-bit capacity past 2^31 would wrap to 0
     * and never reach need. */
    uint64_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    if (c > UINT32_MAX)
        c = UINT32_MAX;
    if (c > SIZE_MAX / sz)
        return KVS_ENOMEM;
    void *b = realloc(*a, (size_t)c * sz);
    if (b == NULL)
        return KVS_ENOMEM;
    *a = b;
    *cap = (uint32_t)c;
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
    if (n > 1)
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
    case '0': /* and up to two more octal digits, as PCRE and Python read it */
        *cp = 0;
        for (int k = 0; k < 2 && p->i + 1 < p->n && p->s[p->i + 1] >= '0' && p->s[p->i + 1] <= '7';
             k++)
            *cp = *cp * 8 + (uint32_t)(p->s[++p->i] - '0');
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

static int gchar(parser_t *p, uint32_t *cp);

/* A class [...] at p->i: a pattern's (`]` first is a literal, class
 * escapes, POSIX classes refused) or a grammar's (its escapes; a line's
 * end ends it unclosed). */
static uint32_t
parse_class(parser_t *p, bool gbnf)
{
    p->i++; /* [ */
    bool neg = p->i < p->n && p->s[p->i] == '^';
    if (neg)
        p->i++;
    cprange_t *r = NULL;
    uint32_t n = 0, cap = 0;
    bool first = true;
    for (;;) {
        if (p->i >= p->n || (gbnf && p->s[p->i] == '\n')) {
            fail(p, "unterminated character class");
            break;
        }
        if (p->s[p->i] == ']' && (!first || gbnf)) {
            p->i++;
            break;
        }
        first = false;
        if (grow((void **)&r, &cap, n + 8, sizeof *r)) {
            oom(p);
            break;
        }
        uint32_t lo;
        if (gbnf) {
            if (gchar(p, &lo))
                break;
        } else if (p->s[p->i] == '\\') {
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
            if (gbnf) {
                if (gchar(p, &hi))
                    break;
            } else if (p->s[p->i] == '\\') {
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
        return parse_class(p, false);
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

/* A quantifier at p->i (* + ? or a brace form, shared by patterns and
 * grammars): true with its bounds; a brace that is not one is left at
 * p->i for the caller. */
static bool
quantifier(parser_t *p, uint32_t *min, uint32_t *max)
{
    char c = p->s[p->i];
    if (c == '*')
        *min = 0, *max = UINT32_MAX;
    else if (c == '+')
        *min = 1, *max = UINT32_MAX;
    else if (c == '?')
        *min = 0, *max = 1;
    else
        return c == '{' && brace_quant(p, min, max);
    p->i++;
    return true;
}

/* sub repeated min..max times, as a node; 0 with p->rc on failure. */
static uint32_t
rep_node(parser_t *p, uint32_t sub, uint32_t min, uint32_t max)
{
    uint32_t r = p->rc ? 0 : new_node(p, A_REP);
    if (p->rc)
        return 0;
    p->nodes[r].sub = sub;
    p->nodes[r].min = min;
    p->nodes[r].max = max;
    return r;
}

static uint32_t
parse_rep(parser_t *p, int depth)
{
    uint32_t a = parse_atom(p, depth);
    while (p->rc == 0 && p->i < p->n) {
        uint32_t min, max;
        if (!quantifier(p, &min, &max))
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
        a = rep_node(p, a, min, max);
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

/* ---- grammars (GBNF) ---------------------------------------------------- */

/* llama.cpp's GBNF, which vLLM's guided_grammar also takes:
 *
 *   root   ::= "(" item ("," ws item)* ")"
 *   item   ::= [a-z]+ | "\"" [^"\\]* "\""   # a comment
 *   ws     ::= [ \t\n]*
 *
 * A rule is `name ::= alternatives` (names of [A-Za-z0-9_-]); an
 * alternative is a sequence of "strings", [classes] (ranges, `^`), `.`
 * (any code point), rule names and (groups), each with * + ? {m} {m,}
 * {m,n} {,n}.  Escapes: \n \r \t \xHH \uHHHH \UHHHHHHHH and escaped
 * punctuation.  A rule ends at a line's end outside parentheses (a line
 * that starts with `|` goes on with it); the output is a sentence of
 * `root`.  Rules become parse-tree nodes as a pattern does, with A_REF
 * for a rule's name. */

enum { MAX_RULES = 1 << 12 };

typedef struct {
    size_t at, len; /* the name in the text */
    uint32_t node;
} grule_t;

static bool
word_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
}

/* Skips blanks and comments; line ends too when lines is set. */
static void
gskip(parser_t *p, bool lines)
{
    while (p->i < p->n) {
        char c = p->s[p->i];
        if (c == '#') {
            while (p->i < p->n && p->s[p->i] != '\n')
                p->i++;
        } else if (c == ' ' || c == '\t' || c == '\r' || (c == '\n' && lines)) {
            p->i++;
        } else {
            break;
        }
    }
}

/* One character of a string or class at p->i, escapes decoded. */
static int
gchar(parser_t *p, uint32_t *cp)
{
    if (p->s[p->i] != '\\')
        return next_cp(p, cp);
    if (++p->i >= p->n)
        return fail(p, "grammar ends after '\\'");
    char c = p->s[p->i++];
    switch (c) {
    case 'n':
        *cp = '\n';
        return 0;
    case 'r':
        *cp = '\r';
        return 0;
    case 't':
        *cp = '\t';
        return 0;
    case 'x':
        return hex_cp(p, 2, cp);
    case 'u':
        return hex_cp(p, 4, cp);
    case 'U':
        return hex_cp(p, 8, cp);
    default:
        if ((c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') ||
            (c >= '{' && c <= '~')) {
            *cp = (uint32_t)c;
            return 0;
        }
        p->i--;
        return fail(p, "unknown escape '\\%c'", c);
    }
}

static uint32_t
gstring(parser_t *p)
{
    uint32_t *items = NULL, n = 0, cap = 0;
    p->i++; /* " */
    while (p->rc == 0) {
        if (p->i >= p->n || p->s[p->i] == '\n') {
            fail(p, "unterminated string");
            break;
        }
        if (p->s[p->i] == '"') {
            p->i++;
            break;
        }
        uint32_t cp;
        if (gchar(p, &cp))
            break;
        uint32_t a = char_node(p, cp);
        if (p->rc == 0 && grow((void **)&items, &cap, n + 1, sizeof *items))
            oom(p);
        if (p->rc == 0)
            items[n++] = a;
    }
    uint32_t id = p->rc ? 0 : list_node(p, A_CAT, items, n);
    free(items);
    return id;
}

static uint32_t galt(parser_t *p, int depth, bool nested);

static uint32_t
gatom(parser_t *p, int depth)
{
    char c = p->s[p->i];
    if (c == '"')
        return gstring(p);
    if (c == '[')
        return parse_class(p, true);
    if (c == '.') {
        p->i++;
        cprange_t r = {0, MAX_CP};
        return set_node(p, &r, 1, false);
    }
    if (c == '(') {
        if (depth >= MAX_DEPTH) {
            fail(p, "groups nested deeper than %d", MAX_DEPTH);
            return 0;
        }
        p->i++;
        gskip(p, true);
        uint32_t g = galt(p, depth + 1, true);
        if (p->rc == 0 && (p->i >= p->n || p->s[p->i] != ')'))
            fail(p, "missing ')'");
        p->i += p->rc == 0;
        return g;
    }
    if (word_char(c)) {
        uint32_t id = new_node(p, A_REF);
        if (p->rc)
            return 0;
        p->nodes[id].r0 = (uint32_t)p->i;
        while (p->i < p->n && word_char(p->s[p->i]))
            p->i++;
        p->nodes[id].nr = (uint32_t)(p->i - p->nodes[id].r0);
        return id;
    }
    fail(p, "unexpected '%c'", c);
    return 0;
}

static uint32_t
grepeat(parser_t *p, int depth)
{
    uint32_t a = gatom(p, depth);
    while (p->rc == 0 && p->i < p->n) {
        uint32_t min, max;
        if (!quantifier(p, &min, &max)) {
            if (p->s[p->i] == '{')
                fail(p, "bad repetition (want {m}, {m,}, {m,n} or {,n})");
            break;
        }
        a = rep_node(p, a, min, max);
    }
    return p->rc ? 0 : a;
}

/* A sequence: up to `|`, `)`, or the line's end outside parentheses. */
static uint32_t
gseq(parser_t *p, int depth, bool nested)
{
    uint32_t *items = NULL, n = 0, cap = 0;
    gskip(p, nested);
    while (p->rc == 0 && p->i < p->n && p->s[p->i] != '|' && p->s[p->i] != ')' &&
           p->s[p->i] != '\n') {
        uint32_t a = grepeat(p, depth);
        if (p->rc == 0 && grow((void **)&items, &cap, n + 1, sizeof *items))
            oom(p);
        if (p->rc)
            break;
        items[n++] = a;
        gskip(p, nested);
    }
    uint32_t id = p->rc ? 0 : list_node(p, A_CAT, items, n);
    free(items);
    return id;
}

static uint32_t
galt(parser_t *p, int depth, bool nested)
{
    uint32_t *items = NULL, n = 0, cap = 0;
    for (;;) {
        uint32_t a = gseq(p, depth, nested);
        if (p->rc == 0 && grow((void **)&items, &cap, n + 1, sizeof *items))
            oom(p);
        if (p->rc)
            break;
        items[n++] = a;
        size_t at = p->i;
        if (!nested)
            gskip(p, true); /* a next line may go on with `|` */
        if (p->i < p->n && p->s[p->i] == '|') {
            p->i++;
            gskip(p, true);
            continue;
        }
        p->i = at;
        break;
    }
    uint32_t id = p->rc ? 0 : list_node(p, A_ALT, items, n);
    free(items);
    return id;
}

static int
cmp_rule(const void *a, const void *b, void *arg)
{
    const grule_t *x = a, *y = b;
    const char *s = arg;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(s + x->at, s + y->at, n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

/* The rule named name[0 .. len), or -1. */
static int32_t
find_rule(const parser_t *p, const grule_t *r, uint32_t n, const char *name, size_t len)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        size_t m = len < r[mid].len ? len : r[mid].len;
        int c = memcmp(name, p->s + r[mid].at, m);
        if (c == 0)
            c = (len > r[mid].len) - (len < r[mid].len);
        if (c == 0)
            return (int32_t)mid;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}

/* Parses the whole grammar into rules (sorted by name), each A_REF's k0
 * the index of the rule it names. */
static int
parse_grammar(parser_t *p, grule_t **out, uint32_t *n_out)
{
    grule_t *r = NULL;
    uint32_t n = 0, cap = 0;
    gskip(p, true);
    while (p->rc == 0 && p->i < p->n) {
        size_t at = p->i;
        while (p->i < p->n && word_char(p->s[p->i]))
            p->i++;
        if (p->i == at) {
            fail(p, "expected a rule name");
            break;
        }
        size_t len = p->i - at;
        gskip(p, false);
        if (p->n - p->i < 3 || memcmp(p->s + p->i, "::=", 3) != 0) {
            fail(p, "expected '::=' after '%.*s'", (int)(len < 64 ? len : 64), p->s + at);
            break;
        }
        p->i += 3;
        gskip(p, true);
        uint32_t node = galt(p, 0, false);
        if (p->rc)
            break;
        if (p->i < p->n && p->s[p->i] != '\n') {
            fail(p, "unexpected '%c'", p->s[p->i]);
            break;
        }
        if (n >= MAX_RULES) {
            fail(p, "more than %d rules", MAX_RULES);
            break;
        }
        if (grow((void **)&r, &cap, n + 1, sizeof *r)) {
            oom(p);
            break;
        }
        r[n++] = (grule_t){at, len, node};
        gskip(p, true);
    }
    if (p->rc == 0 && n > 1)
        qsort_r(r, n, sizeof *r, cmp_rule, (void *)p->s);
    for (uint32_t k = 1; k < n && p->rc == 0; k++)
        if (cmp_rule(&r[k - 1], &r[k], (void *)p->s) == 0) {
            p->i = r[k].at > r[k - 1].at ? r[k].at : r[k - 1].at;
            fail(p, "rule '%.*s' is defined twice", (int)(r[k].len < 64 ? r[k].len : 64),
                 p->s + r[k].at);
        }
    for (uint32_t x = 0; x < p->n_nodes && p->rc == 0; x++) {
        anode_t *a = &p->nodes[x];
        if (a->kind != A_REF)
            continue;
        int32_t k = find_rule(p, r, n, p->s + a->r0, a->nr);
        if (k < 0) {
            p->i = a->r0;
            fail(p, "no rule '%.*s'", (int)(a->nr < 64 ? a->nr : 64), p->s + a->r0);
        }
        a->k0 = (uint32_t)k;
    }
    if (p->rc == 0 && find_rule(p, r, n, "root", 4) < 0) {
        p->i = 0;
        fail(p, "no rule 'root'");
    }
    *out = r;
    *n_out = n;
    return p->rc;
}

/* ---- NFA ------------------------------------------------------------------ */

/* S_CALL and S_RET: a grammar's use of a rule (out: where it returns,
 * out1: the rule) and end of a rule. */
enum { S_BYTE, S_SPLIT, S_MATCH, S_CALL, S_RET };

typedef struct {
    uint8_t kind, lo, hi;
    uint32_t out, out1;
} nstate_t;

typedef struct {
    parser_t *p;
    nstate_t *st;
    uint32_t n, cap;
    /* A set's UTF-8 suffixes shared: (lo, hi, next) -> state, found
     * through a hash (a class of many code points would otherwise cost
     * its square): slot -> entry, live while its gen is the set's. */
    uint32_t *memo;
    uint32_t n_memo, cap_memo;
    uint32_t *mh, *mh_gen;
    uint32_t mh_cap, gen;
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
memo_slot(const nfa_t *a, uint32_t lo, uint32_t hi, uint32_t next)
{
    return (uint32_t)kvs_mix64((uint64_t)next << 16 | lo << 8 | hi) & (a->mh_cap - 1);
}

static void
memo_index(nfa_t *a, uint32_t k)
{
    const uint32_t *m = a->memo + 4 * k;
    uint32_t h = memo_slot(a, m[0], m[1], m[2]);
    while (a->mh_gen[h] == a->gen)
        h = (h + 1) & (a->mh_cap - 1);
    a->mh_gen[h] = a->gen;
    a->mh[h] = k;
}

/* Twice the slots, the set's entries indexed again; on failure the old
 * table stays (an entry left out is only a state not shared). */
static bool
memo_grow(nfa_t *a)
{
    uint32_t cap = a->mh_cap ? 2 * a->mh_cap : 256;
    uint32_t *mh = malloc(cap * sizeof *mh), *g = calloc(cap, sizeof *g);
    if (mh == NULL || g == NULL) {
        free(mh);
        free(g);
        return false;
    }
    free(a->mh);
    free(a->mh_gen);
    a->mh = mh;
    a->mh_gen = g;
    a->mh_cap = cap;
    a->gen = 1;
    for (uint32_t k = 0; k < a->n_memo; k++)
        memo_index(a, k);
    return true;
}

static uint32_t
byte_state(nfa_t *a, uint8_t lo, uint8_t hi, uint32_t next)
{
    if (a->mh_cap) {
        for (uint32_t h = memo_slot(a, lo, hi, next); a->mh_gen[h] == a->gen;
             h = (h + 1) & (a->mh_cap - 1)) {
            const uint32_t *m = a->memo + 4 * a->mh[h];
            if (m[0] == lo && m[1] == hi && m[2] == next)
                return m[3];
        }
    }
    uint32_t s = add_state(a, S_BYTE, lo, hi, next, 0);
    if (s != NFA_FAIL &&
        grow((void **)&a->memo, &a->cap_memo, 4 * (a->n_memo + 1), sizeof *a->memo) == 0) {
        uint32_t k = a->n_memo++;
        uint32_t *m = a->memo + 4 * k;
        m[0] = lo, m[1] = hi, m[2] = next, m[3] = s;
        /* At most half the slots taken, so a probe always ends. */
        if (2 * a->n_memo <= a->mh_cap)
            memo_index(a, k);
        else if (!memo_grow(a))
            a->n_memo--; /* not indexed: forgotten */
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
    if (a->mh_cap && ++a->gen == 0) { /* the stamps wrapped: clear them */
        memset(a->mh_gen, 0, a->mh_cap * sizeof *a->mh_gen);
        a->gen = 1;
    }
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
    case A_REF:
        return add_state(a, S_CALL, 1, 0, next, x.k0);
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
    /* A grammar's: states are added as the output reaches them (trans
     * UNKNOWN until then), so the automaton is one guide's alone. */
    struct gram *gm;
    struct lazy *lz;
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
            c.work += (uint64_t)n * (n > 1 ? 33 - (uint32_t)__builtin_clz(n) : 1);
            /* Few states can still hold huge sets: bound the time, not
             * only the size, and within a state (one state's classes
             * alone can take seconds), since the request's thread waits
             * for this.  Sorting counts n log n, so the sets kept (at most
             * the work) stay tens of MiB. */
            if (p->rc == 0 && c.work > MAX_WORK)
                fail(p, "pattern too complex: its automaton takes over %llu steps to build",
                     (unsigned long long)MAX_WORK);
        }
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

static void lazy_free(struct lazy *z);
static void gram_unref(struct gram *gm);

static void
dfa_unref(guide_dfa_t *d)
{
    if (d == NULL || atomic_fetch_sub(&d->refs, 1) != 1)
        return;
    lazy_free(d->lz);
    gram_unref(d->gm);
    free(d->trans);
    free(d->flags);
    free(d);
}

/* ---- grammar automata, built as the output goes --------------------------- */

/* A grammar's NFA has a call state per use of a rule (out: where the call
 * returns, out1: the rule's start) and one return state; a thread of the
 * pushdown automaton is a byte state with a stack of return states, and a
 * DFA state is a set of threads.  Stacks make those sets unbounded (nested
 * brackets), so states are found as the output reaches them, each guide
 * on its own automaton, which starts afresh from the current state when
 * it passes LAZY_STATES.  A call just before a return pushes nothing, so
 * right recursion (item ::= x item | x) costs no stack. */

typedef struct gram {
    _Atomic uint32_t refs;
    const model_t *m;
    const model_pieces_t *pt;
    nstate_t *st;
    uint32_t n;
    uint8_t *live; /* [n]: whether the state's rule can still end from it */
    uint32_t start, ret;
    uint8_t cls[256];
    uint32_t n_classes;
} gram_t;

typedef struct lazy {
    interner_t in; /* a state's threads: (state << 32 | stack) words, sorted */
    uint32_t cap_rows;
    uint32_t *node; /* [2 * n_nodes]: return state, the stack below; 0 is empty */
    uint32_t n_nodes, cap_node;
    uint32_t *ntab; /* (return, below) -> node + 1, open addressing */
    uint32_t ntab_cap;
    uint64_t *seen; /* threads met in one step, with their generation */
    uint32_t *seen_gen, seen_cap, n_seen, gen;
    uint64_t *todo, *set;
    uint32_t cap_todo, cap_set, n_set;
    uint64_t walk_work; /* threads visited since the guide's last mask or accept began */
    int rc;             /* a cap passed, or memory ran out: the guide is spent */
    char why[128];
} lazy_t;

enum {
    LAZY_STATES = 1 << 12, /* start afresh past this many states */
    LAZY_NODES = 1 << 20,  /* or this many stack nodes */
    MAX_NODES = 1 << 22,
    STEP_WORK = 1 << 18,      /* threads visited by one transition */
    WALK_WORK = 1 << 21,      /* by a whole mask or accept: ~0.1 s at worst */
    MAX_SET_WORDS = 1u << 23, /* threads kept in all states: 32 MiB */
};
#define UNKNOWN UINT32_MAX

static void
lazy_fail(lazy_t *z, int rc, const char *why)
{
    if (z->rc == 0) {
        z->rc = rc;
        snprintf(z->why, sizeof z->why, "%s", why);
    }
}

static uint64_t
mix(uint64_t h)
{
    h ^= h >> 31;
    h *= 0x9E3779B97F4A7C15ull;
    return h ^ h >> 29;
}

/* The stack of ret on below, found or added; UINT32_MAX with z->rc set. */
static uint32_t
push_node(lazy_t *z, uint32_t ret, uint32_t below)
{
    uint32_t mask = z->ntab_cap - 1;
    uint32_t k = (uint32_t)mix((uint64_t)ret << 32 | below) & mask;
    for (;; k = (k + 1) & mask) {
        uint32_t e = z->ntab[k];
        if (e == 0)
            break;
        if (z->node[2 * (e - 1)] == ret && z->node[2 * (e - 1) + 1] == below)
            return e - 1;
    }
    if (z->n_nodes >= MAX_NODES) {
        lazy_fail(z, KVS_ENOSPC, "grammar stacks too deep");
        return UINT32_MAX;
    }
    if (grow((void **)&z->node, &z->cap_node, 2 * (z->n_nodes + 1), sizeof *z->node)) {
        lazy_fail(z, KVS_ENOMEM, "out of memory");
        return UINT32_MAX;
    }
    uint32_t id = z->n_nodes++;
    z->node[2 * id] = ret;
    z->node[2 * id + 1] = below;
    if (2 * z->n_nodes <= z->ntab_cap) {
        z->ntab[k] = id + 1;
        return id;
    }
    uint32_t nc = z->ntab_cap * 2, *t = calloc(nc, sizeof *t);
    if (t == NULL) {
        lazy_fail(z, KVS_ENOMEM, "out of memory");
        return UINT32_MAX;
    }
    for (uint32_t e = 1; e < z->n_nodes; e++) {
        uint32_t j = (uint32_t)mix((uint64_t)z->node[2 * e] << 32 | z->node[2 * e + 1]) & (nc - 1);
        while (t[j])
            j = (j + 1) & (nc - 1);
        t[j] = e + 1;
    }
    free(z->ntab);
    z->ntab = t;
    z->ntab_cap = nc;
    return id;
}

/* Marks thread t met in this step: false when it was already. */
static bool
seen_add(lazy_t *z, uint64_t t)
{
    if (2 * (z->n_seen + 1) > z->seen_cap) {
        uint32_t nc = z->seen_cap ? z->seen_cap * 2 : 256;
        uint64_t *k2 = malloc(nc * sizeof *k2);
        uint32_t *g2 = calloc(nc, sizeof *g2);
        if (k2 == NULL || g2 == NULL) {
            free(k2);
            free(g2);
            lazy_fail(z, KVS_ENOMEM, "out of memory");
            return false;
        }
        for (uint32_t i = 0; i < z->seen_cap; i++)
            if (z->seen_gen[i] == z->gen) {
                uint32_t j = (uint32_t)mix(z->seen[i]) & (nc - 1);
                while (g2[j] == z->gen)
                    j = (j + 1) & (nc - 1);
                k2[j] = z->seen[i];
                g2[j] = z->gen;
            }
        free(z->seen);
        free(z->seen_gen);
        z->seen = k2;
        z->seen_gen = g2;
        z->seen_cap = nc;
    }
    uint32_t mask = z->seen_cap - 1;
    for (uint32_t j = (uint32_t)mix(t) & mask;; j = (j + 1) & mask) {
        if (z->seen_gen[j] != z->gen) {
            z->seen[j] = t;
            z->seen_gen[j] = z->gen;
            z->n_seen++;
            return true;
        }
        if (z->seen[j] == t)
            return false;
    }
}

static void
step_begin(lazy_t *z)
{
    z->n_set = 0;
    z->n_seen = 0;
    if (++z->gen == 0) { /* wrapped: old marks could pass for new ones */
        if (z->seen_gen)
            memset(z->seen_gen, 0, z->seen_cap * sizeof *z->seen_gen);
        z->gen = 1;
    }
}

static void
add_thread(lazy_t *z, uint64_t t)
{
    if (grow((void **)&z->set, &z->cap_set, z->n_set + 1, sizeof *z->set))
        lazy_fail(z, KVS_ENOMEM, "out of memory");
    else
        z->set[z->n_set++] = t;
}

/* Adds the threads reached from state q on stack stk without a byte. */
static void
gclosure(lazy_t *z, const gram_t *gm, uint32_t q0, uint32_t stk0, uint64_t *work)
{
    uint32_t top = 0;
    if (grow((void **)&z->todo, &z->cap_todo, 2, sizeof *z->todo)) {
        lazy_fail(z, KVS_ENOMEM, "out of memory");
        return;
    }
    z->todo[top++] = (uint64_t)q0 << 32 | stk0;
    while (top && z->rc == 0) {
        uint64_t t = z->todo[--top];
        uint32_t q = (uint32_t)(t >> 32), stk = (uint32_t)t;
        if (!gm->live[q] || !seen_add(z, t))
            continue;
        if (++*work > STEP_WORK || ++z->walk_work > WALK_WORK) {
            lazy_fail(z, KVS_ENOSPC, "grammar too ambiguous: one step passes its bound");
            return;
        }
        if (grow((void **)&z->todo, &z->cap_todo, top + 2, sizeof *z->todo)) {
            lazy_fail(z, KVS_ENOMEM, "out of memory");
            return;
        }
        const nstate_t *x = &gm->st[q];
        switch (x->kind) {
        case S_BYTE:
            add_thread(z, t);
            break;
        case S_SPLIT:
            z->todo[top++] = (uint64_t)x->out1 << 32 | stk;
            z->todo[top++] = (uint64_t)x->out << 32 | stk;
            break;
        case S_CALL: {
            uint32_t below = stk;
            if (x->out != gm->ret && (below = push_node(z, x->out, stk)) == UINT32_MAX)
                return;
            z->todo[top++] = (uint64_t)x->out1 << 32 | below;
            break;
        }
        default: /* S_RET: the output may end here on an empty stack */
            if (stk == 0)
                add_thread(z, t);
            else
                z->todo[top++] = (uint64_t)z->node[2 * stk] << 32 | z->node[2 * stk + 1];
            break;
        }
    }
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The DFA state of the threads gathered (0: none), added with its row of
 * unknown transitions when new; 0 with z->rc set on failure. */
static uint32_t
lazy_state(guide_dfa_t *d)
{
    lazy_t *z = d->lz;
    if (z->rc)
        return 0;
    if ((uint64_t)z->in.n_sets_words + 2 * (uint64_t)z->n_set > MAX_SET_WORDS) {
        lazy_fail(z, KVS_ENOSPC, "grammar too ambiguous: its states hold too many threads");
        return 0;
    }
    if (z->n_set > 1)
        qsort(z->set, z->n_set, sizeof *z->set, cmp_u64);
    uint32_t before = d->n_states;
    parser_t p = {.err = z->why, .err_len = sizeof z->why};
    uint32_t id = intern(d, &z->in, &p, (const uint32_t *)z->set, 2 * z->n_set);
    if (p.rc) {
        z->rc = p.rc == KVS_ENOMEM ? KVS_ENOMEM : KVS_ENOSPC;
        return 0;
    }
    if (d->n_states == before)
        return id;
    uint32_t nc = d->n_classes;
    if (d->n_states > z->cap_rows) {
        uint32_t rows = z->cap_rows ? z->cap_rows * 2 : 64;
        uint32_t *t = realloc(d->trans, (size_t)rows * nc * sizeof *t);
        if (t)
            d->trans = t;
        uint8_t *f = realloc(d->flags, rows);
        if (f)
            d->flags = f;
        if (t == NULL || f == NULL) {
            lazy_fail(z, KVS_ENOMEM, "out of memory");
            return 0;
        }
        z->cap_rows = rows;
    }
    uint64_t end = (uint64_t)d->gm->ret << 32;
    bool accept = false;
    for (uint32_t k = 0; k < z->n_set && !accept; k++)
        accept = z->set[k] == end;
    for (uint32_t c = 0; c < nc; c++)
        d->trans[(size_t)id * nc + c] = id ? UNKNOWN : 0;
    d->flags[id] = accept ? F_ACCEPT | (z->n_set == 1 ? F_OVER : 0) : 0;
    return id;
}

static uint32_t
lazy_move(guide_dfa_t *d, uint32_t s, uint8_t b)
{
    lazy_t *z = d->lz;
    const gram_t *gm = d->gm;
    if (z->rc)
        return 0;
    step_begin(z);
    uint64_t work = 0;
    for (uint32_t k = 0; k < z->in.len[s] && z->rc == 0; k += 2) {
        uint64_t t;
        memcpy(&t, z->in.sets + z->in.off[s] + k, sizeof t);
        const nstate_t *x = &gm->st[t >> 32];
        if (x->kind == S_BYTE && x->lo <= b && b <= x->hi)
            gclosure(z, gm, x->out, (uint32_t)t, &work);
    }
    uint32_t id = lazy_state(d);
    if (z->rc)
        return 0;
    d->trans[(size_t)s * d->n_classes + d->cls[b]] = id;
    return id;
}

/* The next state of s on byte b: the table's, or found now. */
static inline uint32_t
move(guide_dfa_t *d, uint32_t s, uint8_t b)
{
    uint32_t t = d->trans[(size_t)s * d->n_classes + d->cls[b]];
    return t != UNKNOWN ? t : lazy_move(d, s, b);
}

static void
gram_unref(gram_t *gm)
{
    if (gm == NULL || atomic_fetch_sub(&gm->refs, 1) != 1)
        return;
    free(gm->st);
    free(gm->live);
    free(gm);
}

static void
lazy_free(lazy_t *z)
{
    if (z) {
        free(z->in.sets);
        free(z->in.off);
        free(z->in.len);
        free(z->in.table);
        free(z->node);
        free(z->ntab);
        free(z->seen);
        free(z->seen_gen);
        free(z->todo);
        free(z->set);
        free(z);
    }
}

/* A fresh automaton of gm holding its dead and start states; NULL when
 * out of memory or when the start passes a bound (then, if p, the reason
 * is p's). */
static guide_dfa_t *
lazy_new(gram_t *gm, parser_t *p)
{
    guide_dfa_t *d = calloc(1, sizeof *d);
    lazy_t *z = calloc(1, sizeof *z);
    if (d == NULL || z == NULL)
        goto fail;
    atomic_init(&d->refs, 1);
    d->m = gm->m;
    d->pt = gm->pt;
    memcpy(d->cls, gm->cls, sizeof d->cls);
    d->n_classes = gm->n_classes;
    d->lz = z;
    z->n_nodes = 1; /* the empty stack */
    z->ntab_cap = 64;
    z->in.table_cap = 64;
    if ((z->ntab = calloc(z->ntab_cap, sizeof *z->ntab)) == NULL ||
        (z->in.table = calloc(z->in.table_cap, sizeof *z->in.table)) == NULL ||
        grow((void **)&z->node, &z->cap_node, 2, sizeof *z->node))
        goto fail;
    z->node[0] = UNKNOWN;
    z->node[1] = 0;
    atomic_fetch_add(&gm->refs, 1);
    d->gm = gm;
    step_begin(z);
    lazy_state(d); /* 0: dead */
    step_begin(z);
    uint64_t work = 0;
    gclosure(z, gm, gm->start, 0, &work);
    d->start = lazy_state(d);
    if (z->rc == 0)
        return d;
    if (p && z->rc == KVS_ENOMEM)
        oom(p);
    else if (p)
        fail(p, "%s", z->why);
fail:
    if (d && d->gm) {
        dfa_unref(d);
        return NULL;
    }
    lazy_free(z);
    free(d);
    return NULL;
}

/* A new automaton of d's grammar holding d's state s (a clone's, or a
 * guide's starting afresh); NULL when out of memory.  The state's stacks
 * move node by node, each node reachable from its threads once (map:
 * old node -> new): threads share their stacks, and copying every
 * thread's whole stack would cost threads x depth, which a grammar can
 * make grow with every token of its output. */
static guide_dfa_t *
lazy_rebase(const guide_dfa_t *d, uint32_t s, uint32_t *s_out)
{
    const lazy_t *z = d->lz;
    guide_dfa_t *e = lazy_new(d->gm, NULL);
    if (e == NULL || s == 0) {
        *s_out = 0;
        return e;
    }
    lazy_t *y = e->lz;
    uint32_t *map = malloc((size_t)z->n_nodes * sizeof *map), *path = NULL, cap_path = 0;
    if (map == NULL)
        lazy_fail(y, KVS_ENOMEM, "out of memory");
    else
        memset(map, 0xff, (size_t)z->n_nodes * sizeof *map);
    step_begin(y);
    for (uint32_t k = 0; k < z->in.len[s] && y->rc == 0; k += 2) {
        uint64_t t;
        memcpy(&t, z->in.sets + z->in.off[s] + k, sizeof t);
        /* Down to a node moved already (the empty stack is node 0 in
         * both), then back up, pushing each node's return state. */
        uint32_t x = (uint32_t)t, n = 0, below;
        map[0] = 0;
        for (; map[x] == UINT32_MAX; x = z->node[2 * x + 1]) {
            if (grow((void **)&path, &cap_path, n + 1, sizeof *path)) {
                lazy_fail(y, KVS_ENOMEM, "out of memory");
                break;
            }
            path[n++] = x;
        }
        for (below = map[x]; n > 0 && y->rc == 0; n--) {
            uint32_t o = path[n - 1];
            if ((below = push_node(y, z->node[2 * o], below)) != UINT32_MAX)
                map[o] = below;
        }
        if (y->rc == 0)
            add_thread(y, (t >> 32) << 32 | below);
    }
    free(map);
    free(path);
    *s_out = y->rc ? 0 : lazy_state(e);
    if (y->rc) {
        dfa_unref(e);
        return NULL;
    }
    return e;
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

/* What parsing and the NFA leave to free, whatever became of them. */
static void
parts_free(parser_t *p, nfa_t *a)
{
    free(p->nodes);
    free(p->kids);
    free(p->ranges);
    free(a->st);
    free(a->memo);
    free(a->mh);
    free(a->mh_gen);
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
    parts_free(&p, &a);
    dfa_unref(d);
    return p.rc;
}

/* ---- grammar guides ------------------------------------------------------ */

/* Which states can still reach their rule's end (a byte state needs a
 * byte, a call a rule that can end); a call or branch into a state that
 * cannot is never taken, so every thread a step keeps can finish. */
static int
live_states(parser_t *p, const nstate_t *st, uint32_t n, uint8_t *live)
{
    uint64_t work = 0;
    for (bool changed = true; changed;) {
        changed = false;
        for (uint32_t s = 0; s < n; s++) {
            if (live[s])
                continue;
            const nstate_t *x = &st[s];
            bool v = x->kind == S_RET     ? true
                     : x->kind == S_BYTE  ? x->lo <= x->hi && live[x->out]
                     : x->kind == S_SPLIT ? live[x->out] || live[x->out1]
                                          : live[x->out] && live[x->out1];
            if (v)
                live[s] = 1, changed = true;
        }
        if ((work += n) > MAX_WORK)
            return fail(p, "grammar too complex to analyse");
    }
    return 0;
}

/* Refuses a rule that can reach a use of itself without a byte between
 * (left recursion): a step would push calls forever.  call_rule[s] is
 * the rule a call state s calls, start[r] each rule's first state. */
static int
left_recursion(parser_t *p, const nstate_t *st, uint32_t n, const uint8_t *live,
               const uint32_t *call_rule, const uint32_t *start, const grule_t *rules, uint32_t nr)
{
    uint8_t *nullable = calloc(nr, 1), *color = calloc(nr, 1);
    uint32_t *mark = calloc(n, sizeof *mark), *stack = malloc(2 * (size_t)n * sizeof *stack);
    uint32_t *from = NULL, *to = NULL, n_edges = 0, cap_from = 0, cap_to = 0, gen = 0;
    uint32_t *first = calloc(nr + 1, sizeof *first), *adj = NULL, *it = NULL;
    uint64_t work = 0;
    if (!nullable || !color || !mark || !stack || !first)
        goto oom;
    /* Rules that can end without a byte, to a fixed point; then the calls
     * each rule makes before its first byte. */
    for (bool changed = true, last = false;; last = !changed) {
        changed = false;
        n_edges = 0;
        for (uint32_t r = 0; r < nr; r++) {
            uint32_t top = 0;
            stack[top++] = start[r];
            gen++;
            while (top) {
                uint32_t s = stack[--top];
                if (!live[s] || mark[s] == gen)
                    continue;
                mark[s] = gen;
                if (++work > MAX_WORK) {
                    fail(p, "grammar too complex to analyse");
                    goto out;
                }
                const nstate_t *x = &st[s];
                if (x->kind == S_SPLIT) {
                    stack[top++] = x->out;
                    stack[top++] = x->out1;
                } else if (x->kind == S_CALL) {
                    uint32_t q = call_rule[s];
                    if (last) {
                        if (grow((void **)&from, &cap_from, n_edges + 1, sizeof *from) ||
                            grow((void **)&to, &cap_to, n_edges + 1, sizeof *to))
                            goto oom;
                        from[n_edges] = r;
                        to[n_edges++] = q;
                    }
                    if (nullable[q])
                        stack[top++] = x->out;
                } else if (x->kind == S_RET && !nullable[r]) {
                    nullable[r] = 1;
                    changed = true;
                }
            }
        }
        if (last && !changed)
            break;
    }
    /* A cycle among those calls, by depth-first search. */
    if ((adj = malloc((n_edges + 1) * sizeof *adj)) == NULL ||
        (it = malloc((nr + 1) * sizeof *it)) == NULL)
        goto oom;
    for (uint32_t e = 0; e < n_edges; e++)
        first[from[e] + 1]++;
    for (uint32_t r = 0; r < nr; r++)
        first[r + 1] += first[r];
    memcpy(it, first, nr * sizeof *it);
    for (uint32_t e = 0; e < n_edges; e++)
        adj[it[from[e]]++] = to[e];
    for (uint32_t r0 = 0; r0 < nr; r0++) {
        if (color[r0])
            continue;
        uint32_t top = 0;
        stack[top++] = r0;
        color[r0] = 1;
        it[r0] = first[r0];
        while (top) {
            uint32_t r = stack[top - 1];
            if (it[r] == first[r + 1]) {
                color[r] = 2;
                top--;
                continue;
            }
            uint32_t q = adj[it[r]++];
            if (color[q] == 1) {
                p->i = rules[q].at;
                fail(p, "rule '%.*s' is left-recursive",
                     (int)(rules[q].len < 64 ? rules[q].len : 64), p->s + rules[q].at);
                goto out;
            }
            if (color[q] == 0) {
                color[q] = 1;
                it[q] = first[q];
                stack[top++] = q;
            }
        }
    }
    goto out;
oom:
    oom(p);
out:
    free(nullable);
    free(color);
    free(mark);
    free(stack);
    free(from);
    free(to);
    free(first);
    free(adj);
    free(it);
    return p->rc;
}

int
model_guide_new_grammar(const model_t *m, const char *text, size_t len, model_guide_t **out,
                        char *err, size_t err_len)
{
    *out = NULL;
    if (err && err_len)
        err[0] = '\0';
    parser_t p = {.s = text, .n = len, .err = err, .err_len = err_len};
    nfa_t a = {.p = &p};
    grule_t *rules = NULL;
    uint32_t nr = 0, *start = NULL, *call_rule = NULL;
    gram_t *gm = NULL;
    guide_dfa_t *d = NULL;
    if (text == NULL) {
        fail(&p, "no grammar");
        goto out;
    }
    if (memchr(text, '\0', len)) {
        p.i = (size_t)((const char *)memchr(text, '\0', len) - text);
        fail(&p, "a NUL byte in the grammar");
        goto out;
    }
    if (parse_grammar(&p, &rules, &nr))
        goto out;
    uint32_t ret = add_state(&a, S_RET, 1, 0, 0, 0);
    if ((start = malloc(nr * sizeof *start)) == NULL) {
        oom(&p);
        goto out;
    }
    for (uint32_t r = 0; r < nr && p.rc == 0; r++) {
        p.i = rules[r].at;
        start[r] = compile(&a, rules[r].node, ret);
    }
    if (p.rc)
        goto out;
    if ((call_rule = calloc(a.n, sizeof *call_rule)) == NULL ||
        (gm = calloc(1, sizeof *gm)) == NULL || (gm->live = calloc(a.n, 1)) == NULL) {
        oom(&p);
        goto out;
    }
    for (uint32_t s = 0; s < a.n; s++)
        if (a.st[s].kind == S_CALL) {
            call_rule[s] = a.st[s].out1;
            a.st[s].out1 = start[a.st[s].out1];
        }
    int32_t root = find_rule(&p, rules, nr, "root", 4);
    if (live_states(&p, a.st, a.n, gm->live) ||
        left_recursion(&p, a.st, a.n, gm->live, call_rule, start, rules, nr))
        goto out;
    if (!gm->live[start[root]]) {
        p.i = rules[root].at;
        fail(&p, "the grammar matches nothing");
        goto out;
    }
    const model_pieces_t *pt = model__pieces(m);
    if (pt == NULL) {
        oom(&p);
        goto out;
    }
    guide_dfa_t tmp;
    byte_classes(&tmp, &a);
    atomic_init(&gm->refs, 1);
    gm->m = m;
    gm->pt = pt;
    gm->st = a.st;
    gm->n = a.n;
    a.st = NULL;
    gm->start = start[root];
    gm->ret = ret;
    memcpy(gm->cls, tmp.cls, sizeof gm->cls);
    gm->n_classes = tmp.n_classes;
    p.i = rules[root].at;
    if ((d = lazy_new(gm, &p)) == NULL || (*out = guide_on(d)) == NULL)
        oom(&p);
    else
        d = NULL;
out:
    parts_free(&p, &a);
    free(rules);
    free(start);
    free(call_rule);
    dfa_unref(d);
    if (gm && gm->st == NULL) {
        free(gm->live);
        free(gm);
    } else {
        gram_unref(gm);
    }
    return p.rc;
}

int
model_guide_clone(const model_guide_t *g, model_guide_t **out)
{
    if (g->d->lz) {
        uint32_t cur;
        *out = NULL;
        if (g->d->lz->rc) /* spent: its clones would be too */
            return g->d->lz->rc;
        guide_dfa_t *d = lazy_rebase(g->d, g->cur, &cur);
        if (d == NULL || (*out = guide_on(d)) == NULL) {
            dfa_unref(d);
            *out = NULL;
            return KVS_ENOMEM;
        }
        (*out)->cur = cur;
        return 0;
    }
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
step(guide_dfa_t *d, uint32_t s, const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n && s; i++)
        s = move(d, s, b[i]);
    return s;
}

bool
model_guide_fullmatch(const model_guide_t *g, const char *s, size_t n)
{
    if (g->d->lz) {
        /* On an automaton of its own, started afresh as it grows: the
         * guide's is for its output. */
        guide_dfa_t *d = lazy_new(g->d->gm, NULL);
        uint32_t q = d ? d->start : 0;
        for (size_t i = 0; i < n && q; i++) {
            d->lz->walk_work = 0; /* a byte at a time, as a guide's accept */
            q = move(d, q, (uint8_t)s[i]);
            if (q && (d->n_states > LAZY_STATES || d->lz->n_nodes > LAZY_NODES)) {
                guide_dfa_t *e = lazy_rebase(d, q, &q);
                dfa_unref(d);
                if ((d = e) == NULL)
                    q = 0;
            }
        }
        bool ok = q && d->lz->rc == 0 && (d->flags[q] & F_ACCEPT);
        dfa_unref(d);
        return ok;
    }
    return (g->d->flags[step(g->d, g->d->start, (const uint8_t *)s, n)] & F_ACCEPT) != 0;
}

/* Which tokens state s lets through, into bits. */
static void
fill_mask(model_guide_t *g, uint32_t s, uint64_t *bits)
{
    guide_dfa_t *d = g->d;
    const model_pieces_t *pt = d->pt;
    uint32_t *st = g->stack, valid = 0;
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
            t = move(d, t, b[j]);
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

/* A grammar's automaton past its size starts afresh from the current
 * state (masks made are of states that are gone); false when that or an
 * earlier step failed, which spends the guide. */
static bool
lazy_ok(model_guide_t *g)
{
    lazy_t *z = g->d->lz;
    if (z == NULL)
        return true;
    z->walk_work = 0; /* each mask and accept has its own budget */
    if (z->rc == 0 && (g->d->n_states > LAZY_STATES || z->n_nodes > LAZY_NODES ||
                       z->in.n_sets_words > MAX_SET_WORDS / 2)) {
        uint32_t cur;
        guide_dfa_t *d = lazy_rebase(g->d, g->cur, &cur);
        if (d == NULL) {
            lazy_fail(z, KVS_ENOMEM, "out of memory");
        } else {
            dfa_unref(g->d);
            g->d = d;
            g->cur = cur;
            memset(g->used, 0, sizeof g->used);
            z = d->lz;
        }
    }
    if (z->rc && z->why[0]) {
        KVS_WARNF("guide: grammar output stopped: %s", z->why);
        z->why[0] = '\0';
    }
    return z->rc == 0;
}

const uint64_t *
model_guide_allowed(model_guide_t *g, uint32_t *n_allowed, int *rc)
{
    const uint64_t *bits = lazy_ok(g) ? mask_bits(g, g->cur) : NULL;
    if (bits != NULL && g->d->lz && g->d->lz->rc)
        bits = NULL; /* a cap passed while making it */
    if (bits == NULL) {
        *rc = g->d->lz && g->d->lz->rc ? g->d->lz->rc : KVS_ENOMEM;
        if (n_allowed)
            *n_allowed = 0;
        return NULL;
    }
    if (n_allowed) {
        *n_allowed = 0;
        for (uint32_t w = 0; w < g->words; w++)
            *n_allowed += (uint32_t)__builtin_popcountll(bits[w]);
    }
    *rc = 0;
    return bits;
}

void
model__mask_row(const uint64_t *bits, uint32_t nv, const float *row, float *out)
{
    if (bits == NULL) {
        for (uint32_t id = 0; id < nv; id++)
            out[id] = -INFINITY;
        return;
    }
    /* A word at a time: most are all out or all in. */
    for (uint32_t w = 0; w * 64 < nv; w++) {
        uint32_t base = w * 64, n = nv - base < 64 ? nv - base : 64;
        uint64_t b = bits[w];
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
}

uint32_t
model_guide_mask(model_guide_t *g, const float *row, float *out)
{
    /* Out of memory or a grammar's cap: nothing to draw (all -inf), which
     * fails the request. */
    uint32_t allowed = 0;
    int rc;
    model__mask_row(model_guide_allowed(g, &allowed, &rc), g->d->m->hp.n_vocab, row, out);
    return allowed;
}

int
model_guide_accept(model_guide_t *g, int32_t id)
{
    if (!lazy_ok(g))
        return g->d->lz->rc;
    guide_dfa_t *d = g->d;
    if (id < 0 || (uint32_t)id >= d->m->hp.n_vocab)
        return KVS_EINVAL;
    if (model_vocab_is_eog(d->m->vocab, id))
        return d->flags[g->cur] & F_ACCEPT ? 1 : KVS_EINVAL;
    const model_pieces_t *pt = d->pt;
    uint32_t a = pt->off[id], n = pt->off[id + 1] - a;
    uint32_t s = n ? step(d, g->cur, pt->bytes + a, n) : 0;
    if (s == 0)
        return d->lz && d->lz->rc ? d->lz->rc : KVS_EINVAL;
    g->cur = s;
    return d->flags[s] & F_OVER ? 1 : 0;
}
