/* libexif: build EXIF data, save it, load it back, read entries and maker notes. */
#include <libexif/exif-data.h>
#include <libexif/exif-loader.h>
#include <stdlib.h>
#include <string.h>

long work(unsigned long i) {
    long r = 0;
    ExifData *d = exif_data_new();
    exif_data_set_byte_order(d, (i & 1) ? EXIF_BYTE_ORDER_INTEL : EXIF_BYTE_ORDER_MOTOROLA);
    exif_data_fix(d);
    ExifEntry *e = exif_entry_new();
    exif_content_add_entry(d->ifd[EXIF_IFD_0], e);
    exif_entry_initialize(e, EXIF_TAG_X_RESOLUTION);
    exif_entry_unref(e);
    unsigned char *buf = NULL;
    unsigned int len = 0;
    exif_data_save_data(d, &buf, &len);
    exif_data_unref(d);
    if (buf) {
        ExifData *back = exif_data_new_from_data(buf, len);
        if (back) {
            char val[128];
            for (int ifd = 0; ifd < EXIF_IFD_COUNT; ifd++)
                for (unsigned k = 0; k < back->ifd[ifd]->count; k++) {
                    exif_entry_get_value(back->ifd[ifd]->entries[k], val, sizeof val);
                    r += (long)strlen(val);
                }
            exif_data_unref(back);
        }
        free(buf);
    }
    return r + len;
}
