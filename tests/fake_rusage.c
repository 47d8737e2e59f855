/*
 * LD_PRELOAD for qemu-img in the tests: getrusage() reports one more
 * second of CPU time at each call.  qemu-img create -f luks calibrates its
 * PBKDF by running it until the thread's CPU time (getrusage) shows half
 * a second spent, whatever iter-time says; with this the first round
 * "took" a second, QEMU settles for its minimum iteration counts, and a
 * create takes milliseconds instead of seconds (and never fails with
 * "Unable to get accurate CPU usage" on a busy machine).  Nothing else in
 * qemu-img reads getrusage; the encryption itself is untouched.
 */
#include <string.h>
#include <sys/resource.h>

static __thread long calls;

int
getrusage(int who, struct rusage *usage)
{
    (void)who;
    memset(usage, 0, sizeof *usage);
    usage->ru_utime.tv_sec = ++calls;
    return 0;
}
