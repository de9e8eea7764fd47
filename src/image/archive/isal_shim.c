/* The part of ISA-L's inflate API (Debian's libisal-dev, igzip_lib.h) that
 * src/image/archive/gunzip.rs uses. `struct inflate_state` is large and its layout
 * belongs to the library's headers, so it stays on this side: Rust holds an
 * opaque pointer and passes plain buffers. */
#include <stdint.h>
#include <stdlib.h>
#include <isa-l/igzip_lib.h>

/* A state that parses a gzip member's header and verifies its CRC-32 and
 * length; NULL when out of memory. */
void *cpi_isal_gunzip_new(void)
{
	struct inflate_state *s = malloc(sizeof *s);
	if (s) {
		isal_inflate_init(s);
		s->crc_flag = ISAL_GZIP;
	}
	return s;
}

/* Ready for the next gzip member. */
void cpi_isal_gunzip_reset(void *state)
{
	struct inflate_state *s = state;
	isal_inflate_reset(s);
	s->crc_flag = ISAL_GZIP;
}

void cpi_isal_gunzip_free(void *state)
{
	free(state);
}

/* Inflates from in[0..in_len) into out[0..out_len); tells how much of each
 * was used and whether the member ended (trailer checked). Returns
 * isal_inflate's code: negative on corrupt data. */
int cpi_isal_gunzip(void *state, const uint8_t *in, uint32_t in_len, uint32_t *in_used,
		    uint8_t *out, uint32_t out_len, uint32_t *out_used, int *member_done)
{
	struct inflate_state *s = state;
	int rc;

	s->next_in = (uint8_t *)in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	rc = isal_inflate(s);
	*in_used = in_len - s->avail_in;
	*out_used = out_len - s->avail_out;
	*member_done = s->block_state == ISAL_BLOCK_FINISH;
	return rc;
}
