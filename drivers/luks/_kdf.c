/*
 * The two loops of a LUKS open that run long in Python: PBKDF2-HMAC (RFC
 * 8018 section 5.2) with its output blocks on several cores at once, and
 * the anti-forensic merge of a key slot's stripes (kdf.af_merge: 4,000
 * stripes, 8,000 hashes for a 512-bit key, on the open's critical path).
 *
 * A LUKS volume key is longer than one digest (a 512-bit XTS key is two
 * SHA-256 blocks), and PBKDF2's blocks (the function F of the RFC) are
 * independent of each other; but every library's PBKDF2 (cryptography's,
 * hashlib's, OpenSSL's) derives them one after another in one call.
 * Opening an image is mostly this derivation, so this module computes the
 * blocks in threads of its own, one per core it is given, with the GIL
 * released: started here, in C, they begin at once, where Python threads
 * would each first wait for the GIL from a start-up busy importing.
 *
 * The hash is OpenSSL's (libcrypto's SHA-1 and SHA-2 functions, which use
 * the CPU's SHA instructions); this file only composes HMAC and the AF
 * diffusion from it.  For PBKDF2, the inner and outer hash states after the
 * padded key are computed once and copied for each of the block's
 * iterations.  The tests check every hash here against `cryptography`'s
 * PBKDF2 and against kdf.py's own merge; kdf.py uses those for every hash
 * this module does not know.
 *
 * OpenSSL 3 deprecates these per-hash functions in favour of EVP, but an
 * EVP context copy allocates: with EVP_MD_CTX_copy_ex for the two copies
 * of each iteration a block took half as long again (bench/README.md).
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED     /* the SHA*_Init family: see above */
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_DIGEST 64
#define MAX_LENGTH (1 << 20)    /* bytes of PBKDF2 output (LUKS keys are <= 64) */
#define MAX_THREADS 64

/*
 * block_<hash>(key, salt, iterations, index, out): T_index of PBKDF2 with
 * HMAC-<hash>; `out` receives DIGEST bytes.
 */
#define DEFINE_BLOCK(NAME, CTX, INIT, UPDATE, FINAL, HASH_BLOCK, DIGEST)              \
static void NAME(const uint8_t *key, size_t key_len, const uint8_t *salt,             \
                 size_t salt_len, unsigned long long iterations, uint32_t index,      \
                 uint8_t *out)                                                         \
{                                                                                      \
    uint8_t pad[HASH_BLOCK], u[DIGEST], sum[DIGEST], counter[4];                       \
    CTX inner, outer, work;                                                            \
    memset(pad, 0, sizeof pad);                                                        \
    if (key_len > HASH_BLOCK) {     /* HMAC: a long key is hashed first */             \
        INIT(&work); UPDATE(&work, key, key_len); FINAL(pad, &work);                   \
    } else {                                                                           \
        memcpy(pad, key, key_len);                                                     \
    }                                                                                  \
    for (size_t i = 0; i < HASH_BLOCK; i++) pad[i] ^= 0x36;                            \
    INIT(&inner); UPDATE(&inner, pad, HASH_BLOCK);                                     \
    for (size_t i = 0; i < HASH_BLOCK; i++) pad[i] ^= 0x36 ^ 0x5c;                     \
    INIT(&outer); UPDATE(&outer, pad, HASH_BLOCK);                                     \
    counter[0] = index >> 24; counter[1] = index >> 16;                                \
    counter[2] = index >> 8; counter[3] = index;                                       \
    /* U1 = HMAC(key, salt || INT(index)) */                                           \
    work = inner; UPDATE(&work, salt, salt_len); UPDATE(&work, counter, 4);            \
    FINAL(u, &work);                                                                   \
    work = outer; UPDATE(&work, u, DIGEST); FINAL(u, &work);                           \
    memcpy(sum, u, DIGEST);                                                            \
    /* U_j = HMAC(key, U_{j-1}); T = U1 ^ U2 ^ ... */                                  \
    for (unsigned long long j = 1; j < iterations; j++) {                              \
        work = inner; UPDATE(&work, u, DIGEST); FINAL(u, &work);                       \
        work = outer; UPDATE(&work, u, DIGEST); FINAL(u, &work);                       \
        for (size_t i = 0; i < DIGEST; i++) sum[i] ^= u[i];                            \
    }                                                                                  \
    memcpy(out, sum, DIGEST);                                                          \
    OPENSSL_cleanse(pad, sizeof pad);                                                  \
    OPENSSL_cleanse(u, sizeof u);                                                      \
    OPENSSL_cleanse(sum, sizeof sum);                                                  \
    OPENSSL_cleanse(&inner, sizeof inner);                                             \
    OPENSSL_cleanse(&outer, sizeof outer);                                             \
    OPENSSL_cleanse(&work, sizeof work);                                               \
}

/*
 * diffuse_<hash>(block, size): the LUKS1 "H1" diffusion in place: each
 * digest-sized piece of the block replaced by the hash of its big-endian
 * 32-bit index and itself, cut to the piece's length.
 */
#define DEFINE_DIFFUSE(NAME, CTX, INIT, UPDATE, FINAL, DIGEST)                         \
static void NAME(uint8_t *block, size_t size)                                          \
{                                                                                      \
    uint8_t digest[DIGEST];                                                            \
    CTX work;                                                                          \
    for (size_t start = 0, index = 0; start < size; start += DIGEST, index++) {        \
        size_t piece = size - start < DIGEST ? size - start : DIGEST;                  \
        const uint8_t counter[4] = {index >> 24, index >> 16, index >> 8, index};      \
        INIT(&work); UPDATE(&work, counter, 4); UPDATE(&work, block + start, piece);   \
        FINAL(digest, &work);                                                          \
        memcpy(block + start, digest, piece);                                          \
    }                                                                                  \
    OPENSSL_cleanse(digest, sizeof digest);                                            \
    OPENSSL_cleanse(&work, sizeof work);                                               \
}


/* Both functions for one hash: its context type, functions, block and digest size. */
#define DEFINE_HASH(HASH, CTX, INIT, UPDATE, FINAL, HASH_BLOCK, DIGEST)               \
    DEFINE_BLOCK(block_##HASH, CTX, INIT, UPDATE, FINAL, HASH_BLOCK, DIGEST)          \
    DEFINE_DIFFUSE(diffuse_##HASH, CTX, INIT, UPDATE, FINAL, DIGEST)

DEFINE_HASH(sha1, SHA_CTX, SHA1_Init, SHA1_Update, SHA1_Final, 64, 20)
DEFINE_HASH(sha224, SHA256_CTX, SHA224_Init, SHA224_Update, SHA224_Final, 64, 28)
DEFINE_HASH(sha256, SHA256_CTX, SHA256_Init, SHA256_Update, SHA256_Final, 64, 32)
DEFINE_HASH(sha384, SHA512_CTX, SHA384_Init, SHA384_Update, SHA384_Final, 128, 48)
DEFINE_HASH(sha512, SHA512_CTX, SHA512_Init, SHA512_Update, SHA512_Final, 128, 64)

/* kdf.af_merge: the key from `stripes` blocks of `size` bytes, into `key` */
static void af_merge(void (*diffuse)(uint8_t *, size_t), const uint8_t *material,
                     size_t size, size_t stripes, uint8_t *key)
{
    memset(key, 0, size);
    for (size_t stripe = 0; stripe + 1 < stripes; stripe++) {
        for (size_t i = 0; i < size; i++)
            key[i] ^= material[stripe * size + i];
        diffuse(key, size);
    }
    for (size_t i = 0; i < size; i++)
        key[i] ^= material[(stripes - 1) * size + i];
}

typedef void (*block_function)(const uint8_t *, size_t, const uint8_t *, size_t,
                               unsigned long long, uint32_t, uint8_t *);

static const struct hash {
    const char *name;       /* as LUKS headers spell it */
    block_function derive;
    void (*diffuse)(uint8_t *, size_t);
    Py_ssize_t digest_size;
} HASHES[] = {
    {"sha1", block_sha1, diffuse_sha1, 20},
    {"sha224", block_sha224, diffuse_sha224, 28},
    {"sha256", block_sha256, diffuse_sha256, 32},
    {"sha384", block_sha384, diffuse_sha384, 48},
    {"sha512", block_sha512, diffuse_sha512, 64},
};

static const struct hash *
find_hash(const char *name)
{
    for (size_t h = 0; h < sizeof HASHES / sizeof HASHES[0]; h++)
        if (strcmp(name, HASHES[h].name) == 0)
            return &HASHES[h];
    PyErr_Format(PyExc_ValueError, "no native code for hash %s", name);
    return NULL;
}

/* One PBKDF2 derivation, its blocks shared out among `stride` threads. */
struct derivation {
    const struct hash *hash;
    const uint8_t *key, *salt;
    size_t key_len, salt_len;
    unsigned long long iterations;
    uint32_t blocks, stride;
    uint8_t *out;                   /* blocks * digest size bytes */
};

struct share {
    const struct derivation *derivation;
    uint32_t first;                 /* blocks first, first + stride, ... */
};

static void
derive_share(const struct derivation *d, uint32_t first)
{
    for (uint32_t index = first; index <= d->blocks; index += d->stride)
        d->hash->derive(d->key, d->key_len, d->salt, d->salt_len, d->iterations, index,
                        d->out + (size_t)(index - 1) * (size_t)d->hash->digest_size);
}

static void *
share_thread(void *arg)
{
    const struct share *share = arg;
    derive_share(share->derivation, share->first);
    return NULL;
}

/* The blocks on d->stride threads: this one and stride - 1 started here (a
 * share whose thread cannot be started is derived on this one instead). */
static void
derive(const struct derivation *d)
{
    pthread_t threads[MAX_THREADS];
    struct share shares[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (uint32_t t = 1; t < d->stride; t++) {
        shares[t] = (struct share){d, t + 1};
        started[t] = pthread_create(&threads[t], NULL, share_thread, &shares[t]) == 0;
    }
    derive_share(d, 1);
    for (uint32_t t = 1; t < d->stride; t++) {
        if (started[t])
            pthread_join(threads[t], NULL);
        else
            derive_share(d, t + 1);
    }
}

static PyObject *
kdf_pbkdf2(PyObject *module, PyObject *args)
{
    const char *hash_name;
    Py_buffer key, salt;
    long long iterations;            /* (L: a negative or huge int is an error, not wrapped) */
    Py_ssize_t length, threads;
    if (!PyArg_ParseTuple(args, "sy*y*Lnn:pbkdf2", &hash_name, &key, &salt, &iterations,
                          &length, &threads))
        return NULL;
    PyObject *result = NULL;
    const struct hash *hash = find_hash(hash_name);
    if (hash != NULL && (iterations < 1 || length < 1 || length > MAX_LENGTH || threads < 1)) {
        PyErr_SetString(PyExc_ValueError,
                        "iterations, length (to 2**20) and threads must be >= 1");
    } else if (hash != NULL) {
        uint32_t blocks = (uint32_t)((length + hash->digest_size - 1) / hash->digest_size);
        struct derivation d = {
            hash, key.buf, salt.buf, (size_t)key.len, (size_t)salt.len,
            (unsigned long long)iterations, blocks,
            (uint32_t)(threads < blocks ? threads : blocks), NULL,
        };
        if (d.stride > MAX_THREADS)
            d.stride = MAX_THREADS;
        size_t size = (size_t)blocks * (size_t)hash->digest_size;
        if ((d.out = PyMem_Malloc(size)) == NULL) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS
            derive(&d);
            Py_END_ALLOW_THREADS
            result = PyBytes_FromStringAndSize((const char *)d.out, length);
            OPENSSL_cleanse(d.out, size);
            PyMem_Free(d.out);
        }
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    return result;
}

static PyObject *
kdf_af_merge(PyObject *module, PyObject *args)
{
    Py_buffer material;
    Py_ssize_t size, stripes;
    const char *hash_name;
    if (!PyArg_ParseTuple(args, "y*nns:af_merge", &material, &size, &stripes, &hash_name))
        return NULL;
    PyObject *result = NULL;
    const struct hash *hash = find_hash(hash_name);
    if (hash != NULL && (size < 1 || stripes < 1 || material.len / size < stripes)) {
        PyErr_SetString(PyExc_ValueError, "af_merge: fewer bytes than the stripes");
    } else if (hash != NULL && (result = PyBytes_FromStringAndSize(NULL, size)) != NULL) {
        uint8_t *key = (uint8_t *)PyBytes_AS_STRING(result);
        Py_BEGIN_ALLOW_THREADS
        af_merge(hash->diffuse, material.buf, (size_t)size, (size_t)stripes, key);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&material);
    return result;
}

static PyObject *
kdf_hashes(PyObject *module, PyObject *unused)
{
    PyObject *names = PyDict_New();
    for (size_t h = 0; names && h < sizeof HASHES / sizeof HASHES[0]; h++) {
        PyObject *size = PyLong_FromSsize_t(HASHES[h].digest_size);
        if (size == NULL || PyDict_SetItemString(names, HASHES[h].name, size) < 0) {
            Py_XDECREF(size);
            Py_CLEAR(names);
            break;
        }
        Py_DECREF(size);
    }
    return names;
}

static PyMethodDef METHODS[] = {
    {"pbkdf2", kdf_pbkdf2, METH_VARARGS,
     "pbkdf2(hash, key, salt, iterations, length, threads) -> bytes: PBKDF2-HMAC, "
     "its output blocks derived on up to `threads` threads, without the GIL."},
    {"af_merge", kdf_af_merge, METH_VARARGS,
     "af_merge(material, key_size, stripes, hash) -> bytes: kdf.af_merge."},
    {"hashes", kdf_hashes, METH_NOARGS,
     "hashes() -> dict: the hash names known here, with their digest sizes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "_kdf",
    "PBKDF2-HMAC with its blocks on several cores, and the AF merge (see kdf.py).", -1, METHODS,
};

PyMODINIT_FUNC
PyInit__kdf(void)
{
    return PyModule_Create(&MODULE);
}
