/* libcue: parse a cue sheet from a string. */
#include <libcue.h>

long work(unsigned long i) {
    const char *sheet =
        "REM GENRE Rock\nPERFORMER \"Someone\"\nTITLE \"Album\"\nFILE \"a.wav\" WAVE\n"
        "  TRACK 01 AUDIO\n    TITLE \"One\"\n    INDEX 01 00:00:00\n"
        "  TRACK 02 AUDIO\n    TITLE \"Two\"\n    INDEX 00 03:10:00\n    INDEX 01 03:12:00\n";
    Cd *cd = cue_parse_string(sheet);
    long r = 0;
    if (cd) {
        r = cd_get_ntrack(cd);
        Track *t = cd_get_track(cd, 2);
        if (t) r += track_get_start(t) + track_get_index(t, (int)(i & 1));
        cd_delete(cd);
    }
    return r;
}
