/* qmatmul_example: embed quantlite's CPU library without Python.
 *
 *     qmatmul_example WEIGHT.safetensors IO.safetensors
 *
 * WEIGHT is one quantized tensor as written by QWeight.save() (docs/FORMAT.md: codes, scales or
 * double-quantized scale_codes, codebook, CSR outliers, and a JSON `meta` with shape and
 * block_size), or a block-scaled int8 one (Q8Weight.to_dict(): qs, float16 scales, meta).
 * IO holds `x` (M, K) float32 and `y` (M, N) float32, the expected x @ W^T.
 * The program checks that the library's ABI version is the header's, builds the weight struct of
 * quantlite.h (ql_weight, resp. ql_weight_int8), runs ql_cpu_qmatmul with the path QL_ISA_AUTO picks
 * (printed) and then forced to every instruction set this CPU has (scalar .. ql_cpu_best_isa()), or
 * ql_cpu_qmatmul_int8 (its instruction set is cpuid's), checks each result against `y` and against
 * its own float64 dequantize-and-multiply of the stored fields, and exits 0 when all agree (printing
 * the errors), 1 when not, 2 on unreadable input. A 4-bit weight also runs the int8-activation
 * opt-in, ql_cpu_qmatmul_q8act, whose relative error is printed.
 *
 * Build (what tests/test_embed_example.py does):
 *     cc -O2 -Icsrc/include csrc/examples/qmatmul_example.c -Lquantlite/_native -lquantlite_cpu \
 *        -Wl,-rpath,quantlite/_native -lm -o qmatmul_example
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quantlite.h"
#include "quantlite_decode.h"

#define MAX_TENSORS 32
#define MAX_HEADER (100u << 20)  /* safetensors' own cap on the JSON header */

/* ---------------------------------------------------------------- a minimal safetensors reader */
typedef struct {
    char name[128];
    char dtype[8];          /* "U8", "F16", "F32", "I32", "U16" */
    int64_t shape[4];
    int rank;
    const uint8_t *data;    /* into the file's bytes */
    int64_t nbytes;
} tensor;

typedef struct {
    uint8_t *bytes;
    tensor tensors[MAX_TENSORS];
    int count;
} safetensors;

static void die(const char *what, const char *detail) {
    fprintf(stderr, "qmatmul_example: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(2);
}

static const char *skip_space(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') ++p;
    return p;
}

/* A JSON string without escapes (tensor names and dtypes never have them) into out. */
static const char *parse_string(const char *p, char *out, size_t size) {
    p = skip_space(p);
    if (*p != '"') die("header", "expected a string");
    const char *end = strchr(p + 1, '"');
    if (!end || (size_t)(end - p - 1) >= size) die("header", "string too long or unterminated");
    memcpy(out, p + 1, (size_t)(end - p - 1));
    out[end - p - 1] = '\0';
    return end + 1;
}

static const char *parse_int_array(const char *p, int64_t *values, int capacity, int *count) {
    p = skip_space(p);
    if (*p++ != '[') die("header", "expected an array");
    *count = 0;
    for (p = skip_space(p); *p != ']'; p = skip_space(p)) {
        if (*count == capacity) die("header", "array too long");
        char *end;
        values[(*count)++] = strtoll(p, &end, 10);
        if (end == p) die("header", "expected an integer");
        p = skip_space(end);
        if (*p == ',') ++p;
    }
    return p + 1;
}

/* Skips one JSON value of any kind (the __metadata__ map and fields this reader ignores). */
static const char *skip_value(const char *p) {
    p = skip_space(p);
    if (*p == '"') {
        for (++p; *p && *p != '"'; ++p)
            if (*p == '\\' && p[1]) ++p;
        if (!*p) die("header", "unterminated string");
        return p + 1;
    }
    if (*p == '{' || *p == '[') {
        const char close = *p == '{' ? '}' : ']';
        for (p = skip_space(p + 1); *p != close; p = skip_space(p)) {
            if (!*p) die("header", "unterminated object");
            p = skip_value(p);
            p = skip_space(p);
            if (*p == ':' || *p == ',') ++p;
        }
        return p + 1;
    }
    while (*p && *p != ',' && *p != '}' && *p != ']') ++p;  /* number, true, false, null */
    return p;
}

static void load_safetensors(const char *path, safetensors *file) {
    FILE *handle = fopen(path, "rb");
    if (!handle) die("cannot open", path);
    fseek(handle, 0, SEEK_END);
    const long size = ftell(handle);
    fseek(handle, 0, SEEK_SET);
    file->bytes = malloc((size_t)size + 1);
    if (!file->bytes || fread(file->bytes, 1, (size_t)size, handle) != (size_t)size) die("cannot read", path);
    fclose(handle);
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = header_size << 8 | file->bytes[i];  /* little-endian u64 */
    if (size < 8 || header_size > MAX_HEADER || 8 + header_size > (uint64_t)size) die("not a safetensors file", path);
    char *header = malloc(header_size + 1);
    memcpy(header, file->bytes + 8, header_size);
    header[header_size] = '\0';
    const uint8_t *data = file->bytes + 8 + header_size;
    const int64_t data_size = size - 8 - (int64_t)header_size;

    const char *p = skip_space(header);
    if (*p++ != '{') die("header", "expected an object");
    file->count = 0;
    for (p = skip_space(p); *p != '}'; p = skip_space(p)) {
        char key[128];
        p = skip_space(parse_string(p, key, sizeof key));
        if (*p++ != ':') die("header", "expected ':'");
        if (strcmp(key, "__metadata__") == 0) {
            p = skip_value(p);
        } else {
            if (file->count == MAX_TENSORS) die("header", "too many tensors");
            tensor *t = &file->tensors[file->count++];
            memset(t, 0, sizeof *t);
            strcpy(t->name, key);
            int64_t offsets[2] = {-1, -1};
            p = skip_space(p);
            if (*p++ != '{') die("header", "expected a tensor object");
            for (p = skip_space(p); *p != '}'; p = skip_space(p)) {
                char field[32];
                p = skip_space(parse_string(p, field, sizeof field));
                if (*p++ != ':') die("header", "expected ':'");
                int count = 0;
                if (strcmp(field, "dtype") == 0) p = parse_string(p, t->dtype, sizeof t->dtype);
                else if (strcmp(field, "shape") == 0) p = parse_int_array(p, t->shape, 4, &t->rank);
                else if (strcmp(field, "data_offsets") == 0) p = parse_int_array(p, offsets, 2, &count);
                else p = skip_value(p);
                p = skip_space(p);
                if (*p == ',') ++p;
            }
            ++p;
            if (offsets[0] < 0 || offsets[1] < offsets[0] || offsets[1] > data_size) die("bad data_offsets for", t->name);
            t->data = data + offsets[0];
            t->nbytes = offsets[1] - offsets[0];
        }
        p = skip_space(p);
        if (*p == ',') ++p;
    }
    free(header);
}

static const tensor *find(const safetensors *file, const char *name, int required) {
    for (int i = 0; i < file->count; ++i)
        if (strcmp(file->tensors[i].name, name) == 0) return &file->tensors[i];
    if (required) die("missing tensor", name);
    return NULL;
}

static int64_t numel(const tensor *t) {
    int64_t count = 1;
    for (int i = 0; i < t->rank; ++i) count *= t->shape[i];
    return count;
}

/* Element i of a tensor as float (F32, F16, U8, I8, I32, U16). Data is little-endian, maybe unaligned. */
static double element(const tensor *t, int64_t i) {
    if (strcmp(t->dtype, "I8") == 0) return (int8_t)t->data[i];
    if (strcmp(t->dtype, "F32") == 0) { float v; memcpy(&v, t->data + 4 * i, 4); return v; }
    if (strcmp(t->dtype, "I32") == 0) { int32_t v; memcpy(&v, t->data + 4 * i, 4); return v; }
    if (strcmp(t->dtype, "F16") == 0) { uint16_t v; memcpy(&v, t->data + 2 * i, 2); return ql_f16_to_f32(v); }
    if (strcmp(t->dtype, "U16") == 0) { uint16_t v; memcpy(&v, t->data + 2 * i, 2); return v; }
    if (strcmp(t->dtype, "U8") == 0) return t->data[i];
    die("unsupported dtype", t->dtype);
    return 0;
}

static float *to_floats(const tensor *t) {
    float *out = malloc(sizeof(float) * (size_t)(numel(t) + 1));
    for (int64_t i = 0; i < numel(t); ++i) out[i] = (float)element(t, i);
    return out;
}

/* An integer field of the `meta` JSON ("block_size": 64), or the two of "shape": [N, K]. */
static void parse_meta(const tensor *meta, int64_t *n, int64_t *k, int64_t *block_size) {
    char *json = calloc((size_t)meta->nbytes + 1, 1);
    memcpy(json, meta->data, (size_t)meta->nbytes);
    const char *shape = strstr(json, "\"shape\""), *block = strstr(json, "\"block_size\"");
    if (!shape || !block) die("meta", "needs shape and block_size");
    int64_t values[2];
    int count;
    parse_int_array(strchr(shape, ':') + 1, values, 2, &count);
    if (count != 2) die("meta", "shape must have two sizes");
    *n = values[0];
    *k = values[1];
    *block_size = strtoll(strchr(block, ':') + 1, NULL, 10);
    free(json);
}

/* ---------------------------------------------------------------- the example */
/* float32 accumulation over K terms against float64: a relative 1e-4 of the largest output is far
 * above the rounding (K * 2^-24 ~ 6e-5 for K = 1024) and far below any decoding mistake. */
static double tolerance_for(const double *reference, int64_t count) {
    double largest = 0;
    for (int64_t i = 0; i < count; ++i) largest = fmax(largest, fabs(reference[i]));
    return 1e-4 * (largest > 0 ? largest : 1);
}

/* Prints one result's errors against the file's y and the float64 reference; 1 when both are within. */
static int check_result(const char *label, const float *y, const float *expected, const double *reference,
                        int64_t count, double tolerance) {
    double worst_vs_file = 0, worst_vs_own = 0;
    for (int64_t i = 0; i < count; ++i) {
        worst_vs_file = fmax(worst_vs_file, fabs(y[i] - expected[i]));
        worst_vs_own = fmax(worst_vs_own, fabs(y[i] - reference[i]));
    }
    const int ok = worst_vs_file <= tolerance && worst_vs_own <= tolerance;
    printf("%-6s %s: max |y - y_file| = %.3g, max |y - float64 reference| = %.3g, tolerance %.3g\n", label,
           ok ? "ok" : "MISMATCH", worst_vs_file, worst_vs_own, tolerance);
    return ok;
}

/* x (M, K) and the expected y (M, N) from the io file, checked against the weight's (N, K). */
static void read_io(const safetensors *io_file, int64_t n, int64_t k, int64_t *m, float **x, float **expected) {
    const tensor *x_t = find(io_file, "x", 1), *y_t = find(io_file, "y", 1);
    if (x_t->rank != 2 || x_t->shape[1] != k || y_t->rank != 2 || y_t->shape[0] != x_t->shape[0] || y_t->shape[1] != n)
        die("io", "x must be (M, K) and y (M, N) for the weight's (N, K)");
    *m = x_t->shape[0];
    *x = to_floats(x_t);
    *expected = to_floats(y_t);
}

/* A copy of a tensor's raw bytes in malloc'd (so aligned) memory: the library reads its typed pointers
 * as arrays of their type, and a tensor's data in the file buffer may be unaligned. */
static void *aligned_bytes(const tensor *t, size_t element_bytes) {
    const size_t bytes = element_bytes * (size_t)numel(t);
    void *copy = malloc(bytes ? bytes : 1);
    memcpy(copy, t->data, bytes);
    return copy;
}

/* An int8 weight (qs, float16 scales): ql_cpu_qmatmul_int8 against its own float64 reference. */
static int run_int8(const safetensors *weight_file, const safetensors *io_file) {
    int64_t n, k, block_size, m;
    parse_meta(find(weight_file, "meta", 1), &n, &k, &block_size);
    const int64_t n_blocks = (k + block_size - 1) / block_size, padded_k = n_blocks * block_size;
    const tensor *qs = find(weight_file, "qs", 1), *scales_t = find(weight_file, "scales", 1);
    if (strcmp(qs->dtype, "I8") != 0 || numel(qs) != n * padded_k || strcmp(scales_t->dtype, "F16") != 0 ||
        numel(scales_t) != n * n_blocks)
        die("int8 weight", "qs must be (N, Kp) I8 and scales (N, Kp / B) F16");
    uint16_t *scale_bits = aligned_bytes(scales_t, sizeof(uint16_t));  /* the F16 bits */
    const ql_weight_int8 weight = {n, k, block_size, (const int8_t *)qs->data, scale_bits};
    float *x, *expected;
    read_io(io_file, n, k, &m, &x, &expected);
    double *reference = malloc(sizeof(double) * (size_t)(m * n));
    for (int64_t row = 0; row < m; ++row)
        for (int64_t col = 0; col < n; ++col) {
            double sum = 0;
            for (int64_t i = 0; i < k; ++i)
                sum += element(qs, col * padded_k + i) * ql_f16_to_f32(scale_bits[col * n_blocks + i / block_size]) * x[row * k + i];
            reference[row * n + col] = sum;
        }
    printf("qmatmul_example: int8 M=%lld N=%lld K=%lld B=%lld\n", (long long)m, (long long)n, (long long)k,
           (long long)block_size);
    float *y = malloc(sizeof(float) * (size_t)(m * n));
    const int status = ql_cpu_qmatmul_int8(&weight, x, m, k, y, n, QL_F32, 0);
    if (status != QL_OK) {
        fprintf(stderr, "qmatmul_example: ql_cpu_qmatmul_int8 failed: %s\n", ql_error_string(status));
        return 1;
    }
    const int ok = check_result("int8", y, expected, reference, m * n, tolerance_for(reference, m * n));
    printf("%s\n", ok ? "OK" : "MISMATCH");
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s WEIGHT.safetensors IO.safetensors\n", argv[0]);
        return 2;
    }
    if (ql_abi_version() != QL_ABI_VERSION) {
        fprintf(stderr, "qmatmul_example: the library has ABI version %d, this program was built for %d\n",
                ql_abi_version(), QL_ABI_VERSION);
        return 2;
    }
    safetensors weight_file, io_file;
    load_safetensors(argv[1], &weight_file);
    load_safetensors(argv[2], &io_file);
    if (find(&weight_file, "qs", 0)) return run_int8(&weight_file, &io_file);

    /* 1. the weight as stored: the library reads each tensor as it is (quantlite.h's storage tags;
     *    multi-byte ones copied to aligned memory, aligned_bytes);
     *    the float32 copies below (scales, columns, values) feed only this program's reference */
    int64_t n, k, block_size;
    parse_meta(find(&weight_file, "meta", 1), &n, &k, &block_size);
    const int64_t n_blocks = (k + block_size - 1) / block_size;
    const tensor *codes = find(&weight_file, "codes", 1);
    float *codebook = to_floats(find(&weight_file, "codebook", 1));
    ql_weight weight = {.n = n, .k = k, .block_size = block_size, .codes = codes->data, .codebook = codebook};
    float *scales;  /* (N, Kp / B) float32, for the reference */
    const tensor *plain_scales = find(&weight_file, "scales", 0);
    if (plain_scales) {
        scales = to_floats(plain_scales);
        weight.scale_kind = strcmp(plain_scales->dtype, "F16") == 0 ? QL_SCALES_F16 : QL_SCALES_F32;
        weight.scales = aligned_bytes(plain_scales, weight.scale_kind == QL_SCALES_F16 ? 2 : 4);
    } else {        /* double quantization: min + code * step of the code's group of 256 scales */
        const tensor *scale_codes = find(&weight_file, "scale_codes", 1);
        float *group_min = to_floats(find(&weight_file, "scale_group_min", 1));
        float *group_step = to_floats(find(&weight_file, "scale_group_step", 1));
        scales = malloc(sizeof(float) * (size_t)(n * n_blocks));
        for (int64_t i = 0; i < n * n_blocks; ++i)
            scales[i] = group_min[i / QL_SCALE_GROUP] + (float)scale_codes->data[i] * group_step[i / QL_SCALE_GROUP];
        weight.scales = scale_codes->data;
        weight.scale_kind = QL_SCALES_DQ;
        weight.scale_group_min = group_min;
        weight.scale_group_step = group_step;
    }
    /* the outlier CSR; a weight without outliers stores none of its three tensors */
    const tensor *row_ptr_t = find(&weight_file, "outlier_row_ptr", 0);
    const tensor *cols_t = row_ptr_t ? find(&weight_file, "outlier_cols", 1) : NULL;
    const tensor *vals_t = row_ptr_t ? find(&weight_file, "outlier_vals", 1) : NULL;
    const int64_t nnz = cols_t ? numel(cols_t) : 0;
    int32_t *row_ptr = calloc((size_t)(n + 1), sizeof(int32_t));
    int32_t *cols = malloc(sizeof(int32_t) * (size_t)(nnz + 1));
    for (int64_t i = 0; row_ptr_t && i <= n; ++i) row_ptr[i] = (int32_t)element(row_ptr_t, i);
    for (int64_t i = 0; i < nnz; ++i) cols[i] = (int32_t)element(cols_t, i);
    float *vals = vals_t ? to_floats(vals_t) : malloc(sizeof(float));
    weight.row_ptr = row_ptr;
    weight.nnz = nnz;
    if (nnz) {
        weight.col_kind = strcmp(cols_t->dtype, "U16") == 0 ? QL_COLS_U16 : QL_COLS_I32;
        weight.cols = aligned_bytes(cols_t, weight.col_kind == QL_COLS_U16 ? 2 : 4);
        weight.val_kind = strcmp(vals_t->dtype, "F16") == 0 ? QL_VALS_F16 : QL_VALS_F32;
        weight.vals = aligned_bytes(vals_t, weight.val_kind == QL_VALS_F16 ? 2 : 4);
    }

    /* 2. x and the expected y */
    int64_t m;
    float *x, *expected;
    read_io(&io_file, n, k, &m, &x, &expected);

    /* 3. an independent float64 reference from the stored fields: dequantize, then multiply */
    const int64_t padded_k = n_blocks * block_size;
    double *reference = malloc(sizeof(double) * (size_t)(m * n));
    for (int64_t row = 0; row < m; ++row) {
        for (int64_t col = 0; col < n; ++col) {
            double sum = 0;
            for (int64_t i = 0; i < k; ++i) {
                const int code = (codes->data[col * (padded_k / 2) + i / 2] >> (4 * (i % 2))) & 15;
                sum += (double)codebook[code] * scales[col * n_blocks + i / block_size] * x[row * k + i];
            }
            for (int64_t e = row_ptr[col]; e < row_ptr[col + 1]; ++e) sum += (double)vals[e] * x[row * k + cols[e]];
            reference[row * n + col] = sum;
        }
    }
    const double tolerance = tolerance_for(reference, m * n);
    printf("qmatmul_example: M=%lld N=%lld K=%lld B=%lld outliers=%lld isa=%s (auto)\n", (long long)m, (long long)n,
           (long long)k, (long long)block_size, (long long)nnz, ql_cpu_isa_name(QL_ISA_AUTO));

    /* 4. the library call: the automatic choice, then every instruction set this CPU has */
    float *y = malloc(sizeof(float) * (size_t)(m * n));
    int ok = 1;
    for (int isa = QL_ISA_AUTO; isa <= ql_cpu_best_isa(); isa = isa == QL_ISA_AUTO ? QL_ISA_SCALAR : isa + 1) {
        const int status = ql_cpu_qmatmul(&weight, x, m, k, y, n, QL_F32, isa, 0);
        if (status != QL_OK) {
            fprintf(stderr, "qmatmul_example: ql_cpu_qmatmul (isa %s) failed: %s\n", ql_cpu_isa_name(isa),
                    ql_error_string(status));
            return 1;
        }
        ok = check_result(isa == QL_ISA_AUTO ? "auto" : ql_cpu_isa_name(isa), y, expected, reference, m * n, tolerance) && ok;
    }
    /* 5. the opt-in with x quantized to int8 (faster, less exact): its error is shown, not checked
     * against the float tolerance (tests/test_native_q8act.py holds it to its own bound) */
    const int status = ql_cpu_qmatmul_q8act(&weight, x, m, k, y, n, QL_F32, QL_ISA_AUTO, 0);
    if (status != QL_OK) {
        fprintf(stderr, "qmatmul_example: ql_cpu_qmatmul_q8act failed: %s\n", ql_error_string(status));
        return 1;
    }
    double error_squares = 0, reference_squares = 0;
    for (int64_t i = 0; i < m * n; ++i) {
        error_squares += (y[i] - reference[i]) * (y[i] - reference[i]);
        reference_squares += reference[i] * reference[i];
    }
    printf("int8 activations (ql_cpu_qmatmul_q8act, opt-in): ||y - float64 reference|| / ||reference|| = %.3g\n",
           sqrt(error_squares / (reference_squares > 0 ? reference_squares : 1)));
    printf("%s\n", ok ? "OK" : "MISMATCH");
    return ok ? 0 : 1;
}
