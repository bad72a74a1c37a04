-- meshloom: the client's SPIFFE ID as an HAProxy sample fetch.
--
-- HAProxy 2.8 has no fetch for a URI SAN, so this walks the DER of the client certificate (`ssl_c_der`) down to
-- its subjectAltName extension and returns the one `spiffe://` URI there. It returns the empty string when there
-- is no certificate, the DER is malformed, or the certificate does not carry exactly one URI SAN: an X.509-SVID has
-- exactly one, and guessing between two would be a hole. (Not nil: HAProxy 2.8 turns a nil fetch result into the
-- string "0". The configuration keeps the result as the client's identity only when it starts with spiffe://.)
--
-- Registered as `lua.meshloom_spiffe_id`. Only DER's definite-length form is accepted (X.509 is DER).

local byte, sub = string.byte, string.sub

-- One TLV at `pos` (1-based) of `s`, not past `limit`: tag, start of the value, end of the value (inclusive).
local function tlv(s, pos, limit)
  if pos + 1 > limit then return nil end
  local tag = byte(s, pos)
  local len = byte(s, pos + 1)
  local start = pos + 2
  if len >= 0x80 then
    local count = len - 0x80
    if count < 1 or count > 4 or start + count - 1 > limit then return nil end
    len = 0
    for i = 0, count - 1 do len = len * 256 + byte(s, start + i) end
    start = start + count
  end
  local stop = start + len - 1
  if stop > limit then return nil end
  return tag, start, stop
end

local SAN_OID = "\x55\x1d\x11" -- 2.5.29.17, subjectAltName
local SEQUENCE, OID, BOOLEAN, OCTET_STRING, EXTENSIONS, URI = 0x30, 0x06, 0x01, 0x04, 0xa3, 0x86

-- The URI SANs of the GeneralNames in s[start..stop].
local function uris(s, start, stop)
  local tag, pos, last = tlv(s, start, stop)
  if tag ~= SEQUENCE then return nil end
  local found = {}
  while pos <= last do
    local t, vs, ve = tlv(s, pos, last)
    if t == nil then return nil end
    if t == URI then found[#found + 1] = sub(s, vs, ve) end
    pos = ve + 1
  end
  return found
end

-- The URI SANs of a DER certificate, or nil when it has no subjectAltName or cannot be read.
local function certificate_uris(der)
  local limit = #der
  local tag, pos, last = tlv(der, 1, limit) -- Certificate
  if tag ~= SEQUENCE then return nil end
  tag, pos, last = tlv(der, pos, last) -- TBSCertificate
  if tag ~= SEQUENCE then return nil end
  while pos <= last do
    local t, vs, ve = tlv(der, pos, last)
    if t == nil then return nil end
    if t == EXTENSIONS then
      local st, es, ee = tlv(der, vs, ve) -- SEQUENCE OF Extension
      if st ~= SEQUENCE then return nil end
      local p = es
      while p <= ee do
        local xt, xs, xe = tlv(der, p, ee) -- Extension
        if xt ~= SEQUENCE then return nil end
        local ot, os, oe = tlv(der, xs, xe)
        if ot ~= OID then return nil end
        if sub(der, os, oe) == SAN_OID then
          local nt, ns, ne = tlv(der, oe + 1, xe)
          if nt == BOOLEAN then nt, ns, ne = tlv(der, ne + 1, xe) end -- `critical`, when present
          if nt ~= OCTET_STRING then return nil end
          return uris(der, ns, ne)
        end
        p = xe + 1
      end
      return nil
    end
    pos = ve + 1
  end
  return nil
end

local function spiffe_id(der)
  if der == nil or #der == 0 then return nil end
  local ok, found = pcall(certificate_uris, der)
  if not ok or found == nil or #found ~= 1 then return nil end
  local uri = found[1]
  if sub(uri, 1, 9) ~= "spiffe://" then return nil end
  return uri
end

core.register_fetches("meshloom_spiffe_id", function(txn)
  return spiffe_id(txn.f:ssl_c_der()) or ""
end)
