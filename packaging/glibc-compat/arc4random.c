/*
 * arc4random() for the static libstdc++ of the release binary.
 *
 * GCC 12's libstdc++ (std::random_device) calls arc4random, which glibc has only since 2.36; linked
 * statically, it would raise the glibc the binary needs from 2.35 to 2.36 and shut out Ubuntu 22.04.
 * This definition, linked into the executable, takes the call instead: 4 bytes from getrandom(2)
 * (glibc 2.25), the kernel's CSPRNG, exactly what glibc's own arc4random does.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/random.h>

uint32_t arc4random(void)
{
    uint32_t value;
    size_t done = 0;
    while (done < sizeof value) {
        ssize_t n = getrandom((char *)&value + done, sizeof value - done, 0);
        if (n > 0)
            done += (size_t)n;
        else if (n < 0 && errno != EINTR)
            abort();
    }
    return value;
}
