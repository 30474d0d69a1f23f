--[[
hostmeter flush-usage: forget a tenant-hour that is safely in the database (protocol version 1).

  EVALSHA <sha1> 3 hm:{T}:posts:H hm:{T}:host:H hm:{T}:service:H <posts seen by the flush>

Deletes the three keys only if no post was recorded since the flush read them (the counter
still equals ARGV[1]); returns 1 when deleted, 0 when a later post keeps them for the next flush.
]]
local posts = redis.call('GET', KEYS[1]) or '0'
if posts ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
