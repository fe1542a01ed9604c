/* libgd: draw, write GIF and PNG to memory, read them back. */
#include <gd.h>

long work(unsigned long i) {
    if ((i & 15) != 0) return 0;
    gdImagePtr im = gdImageCreate(64, 64);
    int bg = gdImageColorAllocate(im, 255, 255, 255), fg = gdImageColorAllocate(im, 200, 0, 0);
    (void)bg;
    gdImageLine(im, 0, 0, 63, (int)(i % 64), fg);
    gdImageFilledRectangle(im, 10, 10, 30, 30, fg);
    int size = 0;
    long r = 0;
    void *gif = gdImageGifPtr(im, &size);
    if (gif) {
        gdImagePtr back = gdImageCreateFromGifPtr(size, gif);
        if (back) { r += gdImageSX(back); gdImageDestroy(back); }
        gdFree(gif);
    }
    void *png = gdImagePngPtr(im, &size);
    if (png) {
        gdImagePtr back = gdImageCreateFromPngPtr(size, png);
        if (back) { r += gdImageSY(back); gdImageDestroy(back); }
        gdFree(png);
    }
    gdImageDestroy(im);
    return r + size;
}
