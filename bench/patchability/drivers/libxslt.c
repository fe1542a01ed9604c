/* libxslt: compile a stylesheet (keys, generate-id, excluded namespaces, variables) and apply
 * it to a document, serialising the result. */
#include <libxml/parser.h>
#include <libxslt/transform.h>
#include <libxslt/xsltutils.h>
#include <string.h>

static const char *xsl =
    "<xsl:stylesheet version='1.0' xmlns:xsl='http://www.w3.org/1999/XSL/Transform'"
    " xmlns:x='urn:x' exclude-result-prefixes='x'>"
    "<xsl:key name='k' match='item' use='@name'/>"
    "<xsl:variable name='g' select='count(//item)'/>"
    "<xsl:template match='/'><out n='{$g}'>"
    "<xsl:for-each select='//item'><i id='{generate-id()}' k='{count(key(\"k\", @name))}'>"
    "<xsl:value-of select='concat(@name, \":\", .)'/></i></xsl:for-each>"
    "<xsl:apply-templates select='//item[1]'/></out></xsl:template>"
    "<xsl:template match='item'><first><xsl:copy-of select='.'/></first></xsl:template>"
    "</xsl:stylesheet>";
static const char *doc_text =
    "<root><item name='a'>1</item><item name='b'>2</item><item name='a'>3</item></root>";

long work(unsigned long i) {
    long r = 0;
    xmlDocPtr sd = xmlReadMemory(xsl, (int)strlen(xsl), "s.xsl", NULL, 0);
    if (!sd) return -1;
    xsltStylesheetPtr ss = xsltParseStylesheetDoc(sd);
    if (!ss) { xmlFreeDoc(sd); return -2; }
    xmlDocPtr d = xmlReadMemory(doc_text, (int)strlen(doc_text), "d.xml", NULL, 0);
    if (d) {
        xmlDocPtr res = xsltApplyStylesheet(ss, d, NULL);
        if (res) {
            xmlChar *buf = NULL;
            int len = 0;
            if (xsltSaveResultToString(&buf, &len, res, ss) == 0) { r = len; xmlFree(buf); }
            xmlFreeDoc(res);
        }
        xmlFreeDoc(d);
    }
    xsltFreeStylesheet(ss);
    return r + (long)(i & 0);
}
