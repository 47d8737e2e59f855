/*
 * LUKS sector encryption for AES, in C: the per-request work of the
 * `luks` driver and of qcow2 `encrypt.format=luks` (crypto.py, which this
 * replaces for AES, says what each mode and IV generator is).
 *
 * Each sector is one unit with an IV derived from its number.  CBC and CTR
 * are one call into OpenSSL per sector, after setting that sector's IV on a
 * context that already holds the key schedule (CBC chains within a sector).
 * XTS (IEEE 1619) is composed here from AES-ECB, as crypto.py does it, in
 * groups of sectors: each sector's first tweak is its IV encrypted with
 * the second key half, each next block's the previous one times alpha in
 * GF(2^128); the group is whitened with the tweaks, goes through one ECB
 * call with the first key half, and is whitened again.  OpenSSL's own XTS
 * would need a call per sector, which cost more than the AES for 512-byte
 * sectors (bench/README.md), has no AES-192, and refuses to encrypt with
 * two equal key halves.  In Python the same work takes a few dozen numpy
 * and `cryptography` calls per request, which cost more than the AES.
 *
 * Contexts: a volume's contexts (the data key's, for XTS the tweak key's,
 * for ESSIV the hashed key's) are made once and reused by every request.  A request takes a
 * set from the volume's free list while it holds the GIL and puts it back
 * after, so requests in worker threads (which run without the GIL) each
 * have a set of their own; a new set is made only when every kept set is
 * in use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 16
#define MAX_KEY 64
#define XTS_GROUP (16 * 1024)       /* bytes of sectors whitened per ECB call */
#define MAX_GROUP_SECTORS (XTS_GROUP / BLOCK)
#define KEPT_SETS 4                 /* context sets a volume keeps for reuse */
#define RELEASE_GIL_MIN (32 * 1024) /* requests at least this large run without the GIL */

enum mode { ECB, CBC, CTR, XTS };
enum ivgen { IV_NONE, IV_NULL, IV_PLAIN, IV_PLAIN64, IV_ESSIV };

/* What one request uses: the data cipher's context, ESSIV's and the XTS
 * tweak key's (or NULL), and for XTS room for one group's tweaks. */
struct context_set {
    EVP_CIPHER_CTX *data;
    EVP_CIPHER_CTX *essiv;
    EVP_CIPHER_CTX *tweak;
    uint8_t *tweaks;
    size_t tweaks_size;
    struct context_set *next;
};

typedef struct {
    PyObject_HEAD
    enum mode mode;
    enum ivgen ivgen;
    const EVP_CIPHER *cipher, *essiv_cipher;   /* (XTS: ECB, for each key half) */
    uint8_t key[MAX_KEY], essiv_key[32];
    size_t key_len;
    Py_ssize_t sector_size;
    struct context_set *free[2];    /* kept sets: [0] decrypt, [1] encrypt */
    int kept[2];
} Sectors;

static const EVP_CIPHER *
aes_cipher(enum mode mode, size_t key_len)
{
    switch (mode) {
    case XTS:       /* two keys of one size, each used in ECB */
        return key_len % 2 ? NULL : aes_cipher(ECB, key_len / 2);
    case CBC:
        return key_len == 16 ? EVP_aes_128_cbc() : key_len == 24 ? EVP_aes_192_cbc()
            : key_len == 32 ? EVP_aes_256_cbc() : NULL;
    case CTR:
        return key_len == 16 ? EVP_aes_128_ctr() : key_len == 24 ? EVP_aes_192_ctr()
            : key_len == 32 ? EVP_aes_256_ctr() : NULL;
    case ECB:
        return key_len == 16 ? EVP_aes_128_ecb() : key_len == 24 ? EVP_aes_192_ecb()
            : key_len == 32 ? EVP_aes_256_ecb() : NULL;
    }
    return NULL;
}

static EVP_CIPHER_CTX *
keyed_context(const EVP_CIPHER *cipher, const uint8_t *key, int encrypt)
{
    EVP_CIPHER_CTX *context = EVP_CIPHER_CTX_new();
    if (context == NULL)
        return NULL;
    if (EVP_CipherInit_ex(context, cipher, NULL, key, NULL, encrypt) != 1 ||
            EVP_CIPHER_CTX_set_padding(context, 0) != 1) {
        EVP_CIPHER_CTX_free(context);
        return NULL;
    }
    return context;
}

static void
free_set(struct context_set *set)
{
    EVP_CIPHER_CTX_free(set->data);
    EVP_CIPHER_CTX_free(set->essiv);
    EVP_CIPHER_CTX_free(set->tweak);
    if (set->tweaks != NULL)
        OPENSSL_cleanse(set->tweaks, set->tweaks_size);
    PyMem_RawFree(set->tweaks);
    PyMem_RawFree(set);
}

static struct context_set *
new_set(const Sectors *self, int encrypt)
{
    struct context_set *set = PyMem_RawCalloc(1, sizeof *set);
    if (set == NULL)
        return NULL;
    set->data = keyed_context(self->cipher, self->key, encrypt);
    if (self->ivgen == IV_ESSIV)
        set->essiv = keyed_context(self->essiv_cipher, self->essiv_key, 1);
    if (self->mode == XTS) {
        set->tweak = keyed_context(self->cipher, self->key + self->key_len / 2, 1);
        set->tweaks_size = XTS_GROUP > self->sector_size ? XTS_GROUP
                                                         : (size_t)self->sector_size;
        set->tweaks = PyMem_RawMalloc(set->tweaks_size);
    }
    if (set->data == NULL || (self->ivgen == IV_ESSIV && set->essiv == NULL) ||
            (self->mode == XTS && (set->tweak == NULL || set->tweaks == NULL))) {
        free_set(set);
        ERR_clear_error();          /* (not left for `cryptography` to find) */
        return NULL;
    }
    return set;
}

/* (called with the GIL held, which guards the free lists) */
static struct context_set *
take_set(Sectors *self, int encrypt)
{
    struct context_set *set = self->free[encrypt];
    if (set != NULL) {
        self->free[encrypt] = set->next;
        self->kept[encrypt]--;
        return set;
    }
    set = new_set(self, encrypt);
    if (set == NULL)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up an AES context");
    return set;
}

static void
give_back(Sectors *self, int encrypt, struct context_set *set)
{
    if (self->kept[encrypt] >= KEPT_SETS) {
        free_set(set);
        return;
    }
    set->next = self->free[encrypt];
    self->free[encrypt] = set;
    self->kept[encrypt]++;
}

/* The IV of sector `number` (crypto.py's SectorCipher._ivs, for one sector). */
static int
sector_iv(const Sectors *self, EVP_CIPHER_CTX *essiv, unsigned long long number,
          uint8_t iv[BLOCK])
{
    memset(iv, 0, BLOCK);
    if (self->ivgen == IV_NULL || self->ivgen == IV_NONE)
        return 1;
    if (self->ivgen == IV_PLAIN)
        number &= 0xFFFFFFFFu;
    for (int i = 0; i < 8; i++)
        iv[i] = (uint8_t)(number >> (8 * i));
    if (self->ivgen != IV_ESSIV)
        return 1;
    int length = 0;
    return EVP_EncryptUpdate(essiv, iv, &length, iv, BLOCK) == 1 && length == BLOCK;
}

/* XTS works on little-endian 64-bit halves of each block */
static inline uint64_t
load_le64(const uint8_t *bytes)
{
    uint64_t value;
    memcpy(&value, bytes, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    value = __builtin_bswap64(value);
#endif
    return value;
}

static inline void
store_le64(uint8_t *bytes, uint64_t value)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    value = __builtin_bswap64(value);
#endif
    memcpy(bytes, &value, 8);
}

/* One XTS group: `count` sectors (at most one group's worth), see the top. */
static int
xts_group(const Sectors *self, struct context_set *set, unsigned long long first,
          const uint8_t *in, uint8_t *out, size_t count)
{
    size_t size = (size_t)self->sector_size, bytes = count * size;
    uint8_t first_tweaks[MAX_GROUP_SECTORS * BLOCK];
    int length = 0;
    for (size_t s = 0; s < count; s++)
        if (!sector_iv(self, set->essiv, first + s, first_tweaks + s * BLOCK))
            return 0;
    if (EVP_EncryptUpdate(set->tweak, first_tweaks, &length, first_tweaks,
                          (int)(count * BLOCK)) != 1 || (size_t)length != count * BLOCK)
        return 0;
    for (size_t s = 0; s < count; s++) {
        uint64_t low = load_le64(first_tweaks + s * BLOCK);
        uint64_t high = load_le64(first_tweaks + s * BLOCK + 8);
        for (size_t at = s * size; at < (s + 1) * size; at += BLOCK) {
            store_le64(set->tweaks + at, low);
            store_le64(set->tweaks + at + 8, high);
            store_le64(out + at, load_le64(in + at) ^ low);
            store_le64(out + at + 8, load_le64(in + at + 8) ^ high);
            /* times alpha: x^128 = x^7 + x^2 + x + 1 (IEEE 1619 section 5.2) */
            uint64_t carry = high >> 63;
            high = high << 1 | low >> 63;
            low = low << 1 ^ (0x87 & (0 - carry));
        }
    }
    if (EVP_CipherUpdate(set->data, out, &length, out, (int)bytes) != 1 ||
            (size_t)length != bytes)
        return 0;
    for (size_t at = 0; at < bytes; at += 8)
        store_le64(out + at, load_le64(out + at) ^ load_le64(set->tweaks + at));
    return 1;
}

static int
xts_sectors(const Sectors *self, struct context_set *set, unsigned long long first,
            const uint8_t *in, uint8_t *out, size_t count)
{
    size_t size = (size_t)self->sector_size;
    size_t group = XTS_GROUP > size ? XTS_GROUP / size : 1;
    for (size_t s = 0; s < count; s += group) {
        size_t sectors = count - s < group ? count - s : group;
        if (!xts_group(self, set, first + s, in + s * size, out + s * size, sectors))
            return 0;
    }
    return 1;
}

/* `count` sectors from `in` to `out`, the first numbered `first`; 0 on failure. */
static int
crypt_sectors(const Sectors *self, struct context_set *set, unsigned long long first,
              const uint8_t *in, uint8_t *out, size_t count)
{
    size_t size = (size_t)self->sector_size;
    int length = 0;
    if (self->mode == XTS)
        return xts_sectors(self, set, first, in, out, count);
    if (self->mode == ECB) {
        /* (EVP_CipherUpdate takes an int length: ECB goes a sector at a time too) */
        for (size_t s = 0; s < count; s++)
            if (EVP_CipherUpdate(set->data, out + s * size, &length, in + s * size,
                                 (int)size) != 1 || (size_t)length != size)
                return 0;
        return 1;
    }
    uint8_t iv[BLOCK];
    for (size_t s = 0; s < count; s++) {
        if (!sector_iv(self, set->essiv, first + s, iv) ||
                EVP_CipherInit_ex(set->data, NULL, NULL, NULL, iv, -1) != 1 ||
                EVP_CipherUpdate(set->data, out + s * size, &length, in + s * size,
                                 (int)size) != 1 || (size_t)length != size)
            return 0;
    }
    return 1;
}

static PyObject *
transform(Sectors *self, PyObject *args, int encrypt)
{
    PyObject *sector;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "O!y*", &PyLong_Type, &sector, &data))
        return NULL;
    /* (a negative or 65-bit sector number is an error, not wrapped) */
    unsigned long long first = PyLong_AsUnsignedLongLong(sector);
    if (first == (unsigned long long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    struct context_set *set = NULL;
    if (self->cipher == NULL) {
        PyErr_SetString(PyExc_ValueError, "AesSectors was not initialised");
    } else if (data.len % self->sector_size) {
        PyErr_SetString(PyExc_ValueError, "request is not a whole number of sectors");
    } else if ((set = take_set(self, encrypt)) != NULL &&
               (result = PyBytes_FromStringAndSize(NULL, data.len)) != NULL) {
        uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
        size_t count = (size_t)(data.len / self->sector_size);
        int done;
        if (data.len >= RELEASE_GIL_MIN) {
            Py_BEGIN_ALLOW_THREADS
            done = crypt_sectors(self, set, first, data.buf, out, count);
            Py_END_ALLOW_THREADS
        } else {
            done = crypt_sectors(self, set, first, data.buf, out, count);
        }
        if (!done) {
            Py_CLEAR(result);
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed on a sector");
            ERR_clear_error();
        }
    }
    if (set != NULL)
        give_back(self, encrypt, set);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *
sectors_decrypt(Sectors *self, PyObject *args)
{
    return transform(self, args, 0);
}

static PyObject *
sectors_encrypt(Sectors *self, PyObject *args)
{
    return transform(self, args, 1);
}

static int
parse_mode(const char *name, enum mode *mode)
{
    static const struct { const char *name; enum mode mode; } MODES[] = {
        {"ecb", ECB}, {"cbc", CBC}, {"ctr", CTR}, {"xts", XTS},
    };
    for (size_t i = 0; i < sizeof MODES / sizeof MODES[0]; i++)
        if (strcmp(name, MODES[i].name) == 0) {
            *mode = MODES[i].mode;
            return 1;
        }
    return 0;
}

static int
parse_ivgen(const char *name, enum ivgen *ivgen)
{
    static const struct { const char *name; enum ivgen ivgen; } IVGENS[] = {
        {"", IV_NONE}, {"null", IV_NULL}, {"plain", IV_PLAIN}, {"plain64", IV_PLAIN64},
        {"essiv", IV_ESSIV},
    };
    for (size_t i = 0; i < sizeof IVGENS / sizeof IVGENS[0]; i++)
        if (strcmp(name, IVGENS[i].name) == 0) {
            *ivgen = IVGENS[i].ivgen;
            return 1;
        }
    return 0;
}

static int
sectors_init(Sectors *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"mode", "ivgen", "key", "sector_size", "essiv_key", NULL};
    const char *mode_name, *ivgen_name;
    Py_buffer key, essiv_key = {0};
    PyObject *essiv_object = Py_None;
    Py_ssize_t sector_size;
    if (self->cipher != NULL) {
        PyErr_SetString(PyExc_TypeError, "AesSectors is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssy*n|O:AesSectors", names, &mode_name,
                                     &ivgen_name, &key, &sector_size, &essiv_object))
        return -1;
    if (essiv_object != Py_None &&
            PyObject_GetBuffer(essiv_object, &essiv_key, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&key);
        return -1;
    }
    const char *problem = NULL;
    if (!parse_mode(mode_name, &self->mode) || !parse_ivgen(ivgen_name, &self->ivgen))
        problem = "mode or IV generator not done here";
    else if ((self->mode == ECB) != (self->ivgen == IV_NONE))
        problem = "ECB alone has no IV generator";
    else if (key.len > MAX_KEY || (self->cipher = aes_cipher(self->mode, (size_t)key.len)) == NULL)
        problem = "key size not done here";
    else if (sector_size < BLOCK || sector_size % BLOCK || sector_size > (1 << 20))
        problem = "sector size must be a multiple of 16 up to 1 MiB";
    else if ((self->ivgen == IV_ESSIV) != (essiv_key.buf != NULL) ||
             (essiv_key.buf != NULL && (essiv_key.len > 32 ||
              (self->essiv_cipher = aes_cipher(ECB, (size_t)essiv_key.len)) == NULL)))
        problem = "ESSIV needs a 128, 192 or 256-bit hashed key, and only ESSIV takes one";
    if (problem == NULL) {
        memcpy(self->key, key.buf, (size_t)key.len);
        self->key_len = (size_t)key.len;
        if (essiv_key.buf != NULL)
            memcpy(self->essiv_key, essiv_key.buf, (size_t)essiv_key.len);
        self->sector_size = sector_size;
        /* a set each way made now: a key OpenSSL refuses fails here, not on
         * a write */
        for (int encrypt = 0; encrypt < 2 && problem == NULL; encrypt++) {
            struct context_set *set = new_set(self, encrypt);
            if (set == NULL)
                problem = "OpenSSL refused the key";
            else
                give_back(self, encrypt, set);
        }
    }
    PyBuffer_Release(&key);
    if (essiv_key.buf != NULL)
        PyBuffer_Release(&essiv_key);
    if (problem != NULL) {
        self->cipher = NULL;        /* (kept sets are freed with the object) */
        PyErr_SetString(PyExc_ValueError, problem);
        return -1;
    }
    return 0;
}

static void
sectors_dealloc(Sectors *self)
{
    for (int encrypt = 0; encrypt < 2; encrypt++)
        while (self->free[encrypt] != NULL) {
            struct context_set *next = self->free[encrypt]->next;
            free_set(self->free[encrypt]);
            self->free[encrypt] = next;
        }
    OPENSSL_cleanse(self->key, sizeof self->key);
    OPENSSL_cleanse(self->essiv_key, sizeof self->essiv_key);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef SECTORS_METHODS[] = {
    {"decrypt", (PyCFunction)sectors_decrypt, METH_VARARGS,
     "decrypt(sector, data) -> bytes: whole sectors, the first numbered `sector`."},
    {"encrypt", (PyCFunction)sectors_encrypt, METH_VARARGS,
     "encrypt(sector, data) -> bytes: whole sectors, the first numbered `sector`."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SECTORS_TYPE = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "imgfs.drivers.luks._sectors.AesSectors",
    .tp_basicsize = sizeof(Sectors),
    .tp_dealloc = (destructor)sectors_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AesSectors(mode, ivgen, key, sector_size, essiv_key=None): the AES sector "
              "cipher of one volume (mode: ecb, cbc, ctr, xts; ivgen: '' for ecb, else "
              "null, plain, plain64, essiv).  ValueError for what is not done here.",
    .tp_methods = SECTORS_METHODS,
    .tp_init = (initproc)sectors_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "_sectors",
    "LUKS sector encryption with AES in OpenSSL (see crypto.py for the Python path).",
    -1, NULL,
};

PyMODINIT_FUNC
PyInit__sectors(void)
{
    if (PyType_Ready(&SECTORS_TYPE) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&MODULE);
    if (module == NULL)
        return NULL;
    Py_INCREF(&SECTORS_TYPE);
    if (PyModule_AddObject(module, "AesSectors", (PyObject *)&SECTORS_TYPE) < 0) {
        Py_DECREF(&SECTORS_TYPE);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
