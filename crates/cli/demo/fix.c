/* The fix for service.c's is_admin(), compiled on its own into a relocatable object:
 *   gcc -O2 -c -ffunction-sections -fdata-sections fix.c
 * `admins` is static in the service: the patch binds to the running copy (state is shared, not
 * copied), as it does to the existing global `admin_checks_denied`. */
#include <string.h>

extern const char *admins[];
extern long admin_checks_denied;

int is_admin(const char *user) {
    for (int i = 0; admins[i]; i++)
        if (strcmp(user, admins[i]) == 0) /* exact match */
            return 1;
    __atomic_add_fetch(&admin_checks_denied, 1, __ATOMIC_SEQ_CST);
    return 0;
}
