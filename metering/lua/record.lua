--[[
hostmeter post-time recording, protocol version 1 (Redis 7 / ElastiCache; Lua 5.1 scripting).

Records one post: the metric names a host (or a service) posted, into the bitmap of its
(tenant, UTC hour). One call is one round trip; a name already recorded for that host and hour
sets nothing, so memory grows with host-hours, not with posts.

  EVALSHA <sha1 of this file> 3 <dict> <hour> <posts> <field> <kind> <name> [<name> ...]

  KEYS[1] dict   hm:{T}:dict:host  or  hm:{T}:dict:service   name -> dense id (HASH)
  KEYS[2] hour   hm:{T}:host:H     or  hm:{T}:service:H      field -> flags + bitmap (HASH)
  KEYS[3] posts  hm:{T}:posts:H                              posts recorded in the hour (STRING)
  ARGV[1] field  the host name (host posts) or the service name (service posts)
  ARGV[2] kind   "standard" or "micro" (host posts), "service" (service posts)
  ARGV[3..]      the metric names of the post (at least one)

  T is the tenant, in braces: a Redis Cluster hash tag, so that every key of a tenant lives in
  one slot. A tenant whose name holds "{" or "}" cannot be recorded here (ingest takes it).
  H is the UTC hour of the post as whole hours since 1970-01-01T00:00:00Z (floor(unix / 3600)).

Returns the number of bits the post newly set (0 for a repeated post). Errors (a reply error whose
message starts with "hostmeter:") leave everything as it was.

Value layout of KEYS[2]'s fields: byte 1 holds flags (1: a standard post was seen, 2: a micro
post was seen, 4: a service post); then the bitmap of the dictionary ids posted (bit id % 8 of
bitmap byte floor(id / 8)), stored as segments that skip its runs of zero bytes: each segment is
a 3-byte big-endian count of zero bytes skipped since the previous segment's end, a 1-byte
length n (1 to 255), and n bitmap bytes. (A host posts the tenant's common names, low ids, and
its own application's, a range further up: two short segments instead of a bitmap as long as
the tenant's dictionary.) metering.hotpath.value_bits decodes it; flush-usage moves these into
the database.
]]
local dict, hourkey, postskey = KEYS[1], KEYS[2], KEYS[3]
if #KEYS ~= 3 then
  return redis.error_reply('hostmeter: expected 3 keys (dict, hour, posts), got ' .. #KEYS)
end
local prefix, ns = string.match(dict, '^(hm:{[^{}]+}):dict:(%a+)$')
if prefix == nil or (ns ~= 'host' and ns ~= 'service') then
  return redis.error_reply('hostmeter: KEYS[1] must be hm:{tenant}:dict:host or :dict:service')
end
local head = prefix .. ':' .. ns .. ':'
local hour = string.sub(hourkey, 1, #head) == head and string.match(hourkey, '^%d+$', #head + 1)
if not hour then
  return redis.error_reply('hostmeter: KEYS[2] must be ' .. prefix .. ':' .. ns .. ':<hour>')
end
if postskey ~= prefix .. ':posts:' .. hour then
  return redis.error_reply('hostmeter: KEYS[3] must be ' .. prefix .. ':posts:' .. hour)
end

-- The checks of ingest (metering/records.py): 1..limit bytes of valid UTF-8, no NUL, not only
-- whitespace (Python's str.isspace: ASCII blanks, \28-\31, and the Unicode spaces below).
-- A value is checked when it is new (a name new to the dictionary, a host new to the hour):
-- what the dictionary and the hour already hold passed these checks when it entered.
local function valid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    if c < 0x80 then
      i = i + 1
    elseif c >= 0xC2 and c <= 0xDF then
      local c2 = string.byte(s, i + 1)
      if not c2 or c2 < 0x80 or c2 > 0xBF then return false end
      i = i + 2
    elseif c >= 0xE0 and c <= 0xEF then
      local c2, c3 = string.byte(s, i + 1, i + 2)
      if not c3 or c3 < 0x80 or c3 > 0xBF then return false end
      local lo, hi = 0x80, 0xBF
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end  -- overlong, surrogates
      if c2 < lo or c2 > hi then return false end
      i = i + 3
    elseif c >= 0xF0 and c <= 0xF4 then
      local c2, c3, c4 = string.byte(s, i + 1, i + 3)
      if not c4 or c3 < 0x80 or c3 > 0xBF or c4 < 0x80 or c4 > 0xBF then return false end
      local lo, hi = 0x80, 0xBF
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end  -- overlong, > U+10FFFF
      if c2 < lo or c2 > hi then return false end
      i = i + 4
    else
      return false
    end
  end
  return true
end

local SPACES = {'[ \t\n\v\f\r\28-\31]', '\194[\133\160]', '\225\154\128', '\226\128[\128-\138]',
                '\226\128[\168\169\175]', '\226\129\159', '\227\128\128'}
local function blank(s)
  for _, space in ipairs(SPACES) do
    s = string.gsub(s, space, '')
  end
  return #s == 0
end

local function bad_text(s, limit)
  return s == nil or #s == 0 or #s > limit or string.find(s, '\0', 1, true) ~= nil
    or not valid_utf8(s) or blank(s)
end

local field, kind = ARGV[1], ARGV[2]
if field == nil then
  return redis.error_reply('hostmeter: ARGV[1] must be the host or service')
end
local flag
if ns == 'host' then
  if kind == 'standard' then flag = 1 elseif kind == 'micro' then flag = 2 end
elseif kind == 'service' then
  flag = 4
end
if flag == nil then
  return redis.error_reply('hostmeter: ARGV[2] must be standard or micro for host keys, service for service keys')
end
if #ARGV < 3 then
  return redis.error_reply('hostmeter: a post needs at least one metric name')
end

-- names -> ids (false: new to the tenant's dictionary, checked here before anything is written)
local ids = {}
local CHUNK = 1000
for first = 3, #ARGV, CHUNK do
  local last = math.min(first + CHUNK - 1, #ARGV)
  local got = redis.call('HMGET', dict, unpack(ARGV, first, last))
  for j = 1, #got do
    local id = got[j]
    if not id and bad_text(ARGV[first + j - 1], 500) then
      return redis.error_reply('hostmeter: metric name ' .. (first + j - 3) .. ' must be 1 to 500 bytes of UTF-8, not blank, without NUL')
    end
    ids[first + j - 3] = id and tonumber(id) or false
  end
end

local old = redis.call('HGET', hourkey, field)
if not old then  -- the first post of this host (or service) in the hour
  if bad_text(field, 255) then
    return redis.error_reply('hostmeter: ARGV[1] (host or service) must be 1 to 255 bytes of UTF-8, not blank, without NUL')
  end
  local tenant = string.sub(prefix, 5, -2)
  if bad_text(tenant, 200) then
    return redis.error_reply('hostmeter: the tenant in the keys must be 1 to 200 bytes of UTF-8, not blank, without NUL')
  end
end

-- new names get the next dense ids of the dictionary (a name twice in one post: one id)
local size = nil
local fresh = {}
for k = 1, #ids do
  if not ids[k] then
    local name = ARGV[k + 2]
    local id = fresh[name]
    if id == nil then
      if size == nil then size = redis.call('HLEN', dict) end
      id = size
      size = size + 1
      redis.call('HSET', dict, name, id)
      fresh[name] = id
    end
    ids[k] = id
  end
end

-- OR the ids (and the kind's flag) into the field's value. Most posts repeat the names of the
-- host's previous post: their bits are tested against the stored bytes, and the value is
-- rebuilt (and written) only when a bit is missing.
local MASKS = {[0] = 1, 2, 4, 8, 16, 32, 64, 128}
local band, byte = bit.band, string.byte
local stored = {}  -- bitmap byte index (0-based) -> byte, for the bytes the value holds
local flags = 0
if old then
  flags = byte(old, 1)
  local pos, index, size = 2, 0, #old
  while pos <= size do
    local g1, g2, g3, n = byte(old, pos, pos + 3)
    index = index + g1 * 65536 + g2 * 256 + g3
    for k = 0, n - 1 do stored[index + k] = byte(old, pos + 4 + k) end
    index = index + n
    pos = pos + 4 + n
  end
end
local missing = band(flags, flag) == 0
if not missing then
  for j = 1, #ids do
    local id = ids[j]
    if band(stored[(id - id % 8) / 8] or 0, MASKS[id % 8]) == 0 then
      missing = true
      break
    end
  end
end
if not missing then
  redis.call('INCR', postskey)
  return 0
end

local added = 0
for j = 1, #ids do
  local id = ids[j]
  local index, mask = (id - id % 8) / 8, MASKS[id % 8]
  local b = stored[index] or 0
  if band(b, mask) == 0 then
    stored[index] = bit.bor(b, mask)
    added = added + 1
  end
end
local order = {}
for index in pairs(stored) do order[#order + 1] = index end
table.sort(order)
-- segments: a new one where more than 4 zero bytes (a segment header's size) lie between
local out = {string.char(bit.bor(flags, flag))}
local k, last = 1, 0
while k <= #order do
  local first = order[k]
  local stop = k
  while stop < #order and order[stop + 1] - order[stop] <= 5
      and order[stop + 1] - first < 255 do
    stop = stop + 1
  end
  local n = order[stop] - first + 1
  local gap = first - last
  local seg = {math.floor(gap / 65536) % 256, math.floor(gap / 256) % 256, gap % 256, n}
  for index = first, order[stop] do seg[#seg + 1] = stored[index] or 0 end
  out[#out + 1] = string.char(unpack(seg))
  last = order[stop] + 1
  k = stop + 1
end
redis.call('HSET', hourkey, field, table.concat(out))
redis.call('INCR', postskey)
return added
