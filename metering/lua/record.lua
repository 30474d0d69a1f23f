--[[
hostmeter post-time recording, protocol version 1 (Redis 7 / ElastiCache; Lua 5.1 scripting).

Records one post: the metric names a host (or a service) posted, into the bitmap of its
(tenant, UTC hour). One call is one round trip; a name already recorded for that host and hour
sets nothing, so memory grows with host-hours, not with posts.

  EVALSHA <sha1 of this file> 3 <dict> <hour> <posts> <field> <kind> <name> [<name> ...]

  KEYS[1] dict   hm:{T}:dict:host  or  hm:{T}:dict:service   name -> dense id (HASH)
  KEYS[2] hour   hm:{T}:host:H     or  hm:{T}:service:H      field -> flags byte + bitmap (HASH)
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
post was seen, 4: a service post); from byte 2 on, bit (id % 8) of byte 2 + floor(id / 8) is set
when the name with dictionary id `id` was posted. flush-usage moves these into the database.
]]
local dict, hourkey, postskey = KEYS[1], KEYS[2], KEYS[3]
if #KEYS ~= 3 then
  return redis.error_reply('hostmeter: expected 3 keys (dict, hour, posts), got ' .. #KEYS)
end
local prefix, ns = string.match(dict, '^(hm:{[^{}]+}):dict:(%a+)$')
if prefix == nil or (ns ~= 'host' and ns ~= 'service') then
  return redis.error_reply('hostmeter: KEYS[1] must be hm:{tenant}:dict:host or :dict:service')
end
local hour = string.match(hourkey, '^' .. prefix:gsub('%p', '%%%0') .. ':' .. ns .. ':(%d+)$')
if hour == nil then
  return redis.error_reply('hostmeter: KEYS[2] must be ' .. prefix .. ':' .. ns .. ':<hour>')
end
if postskey ~= prefix .. ':posts:' .. hour then
  return redis.error_reply('hostmeter: KEYS[3] must be ' .. prefix .. ':posts:' .. hour)
end

local function bad_name(s, limit)
  -- the checks of ingest: 1..limit bytes, not blank, no NUL
  return #s == 0 or #s > limit or string.find(s, '\0', 1, true) ~= nil
    or string.find(s, '[^ \t\n\r\f\v]') == nil
end

local field, kind = ARGV[1], ARGV[2]
if field == nil or bad_name(field, 255) then
  return redis.error_reply('hostmeter: ARGV[1] (host or service) must be 1 to 255 bytes, not blank, without NUL')
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
local n = #ARGV - 2
if n < 1 then
  return redis.error_reply('hostmeter: a post needs at least one metric name')
end
for i = 3, #ARGV do
  if bad_name(ARGV[i], 500) then
    return redis.error_reply('hostmeter: metric name ' .. (i - 2) .. ' must be 1 to 500 bytes, not blank, without NUL')
  end
end

-- names -> ids; new names get the next dense ids of the tenant's dictionary
local ids = {}
local size = nil
local CHUNK = 1000
for first = 3, #ARGV, CHUNK do
  local last = math.min(first + CHUNK - 1, #ARGV)
  local got = redis.call('HMGET', dict, unpack(ARGV, first, last))
  for j = 1, #got do
    local id = got[j]
    if id then
      ids[#ids + 1] = tonumber(id)
    else
      local name = ARGV[first + j - 1]
      id = redis.call('HGET', dict, name)  -- the same new name twice in one post
      if not id then
        if size == nil then size = redis.call('HLEN', dict) end
        id = size
        size = size + 1
        redis.call('HSET', dict, name, id)
      end
      ids[#ids + 1] = tonumber(id)
    end
  end
end

-- OR the ids (and the kind's flag) into the field's value
local old = redis.call('HGET', hourkey, field)
local bytes = {}
if old then
  for first = 1, #old, 4000 do
    local part = {string.byte(old, first, math.min(first + 3999, #old))}
    for j = 1, #part do bytes[first + j - 1] = part[j] end
  end
else
  bytes[1] = 0
end
local added = 0
local function setbit(pos, mask)
  for k = #bytes + 1, pos do bytes[k] = 0 end
  local b = bytes[pos]
  if bit.band(b, mask) == 0 then
    bytes[pos] = bit.bor(b, mask)
    return true
  end
  return false
end
local changed = setbit(1, flag)
for j = 1, #ids do
  local id = ids[j]
  if setbit(2 + math.floor(id / 8), bit.lshift(1, id % 8)) then
    added = added + 1
    changed = true
  end
end
if changed then
  local parts = {}
  for first = 1, #bytes, 4000 do
    parts[#parts + 1] = string.char(unpack(bytes, first, math.min(first + 3999, #bytes)))
  end
  redis.call('HSET', hourkey, field, table.concat(parts))
end
redis.call('INCR', postskey)
return added
