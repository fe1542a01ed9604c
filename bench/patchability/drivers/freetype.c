/* FreeType: load a system font, set sizes, load and render glyphs (TrueType hinting). */
#include <ft2build.h>
#include FT_FREETYPE_H

long work(unsigned long i) {
    static FT_Library lib;
    static const char *font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    if (!lib && FT_Init_FreeType(&lib)) return -1;
    if ((i & 7) != 0) return 0;
    FT_Face face;
    if (FT_New_Face(lib, font, 0, &face)) return -2;
    long r = 0;
    FT_Set_Pixel_Sizes(face, 0, 12 + (FT_UInt)(i % 24));
    for (const char *c = "Hello, wörld 0123"; *c; c++) {
        if (FT_Load_Char(face, (unsigned char)*c, FT_LOAD_RENDER) == 0)
            r += face->glyph->bitmap.rows;
    }
    FT_Done_Face(face);
    return r;
}
